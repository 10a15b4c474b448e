import Foundation
import MoECheckpoint
import MoECompute
@testable import MoEModel
import XCTest
import MoETestSupport

/// One definition of every router name (`RouterKind`): what training writes to
/// `moe-gpu.router`, what `inspect` prints and what the host implementation
/// (`MoEMath`, used by `upcycle --verify`) computes must be the same function as
/// the trained layer.
final class RouterNameTests: XCTestCase {
    struct Case {
        let label: String
        let router: String
        var gateOrder = "softmax-topk"
        var renormalize = true
        var capacityFactor: Double? = nil
        let expected: RouterKind
    }

    static let cases = [
        Case(label: "top-k renormalised", router: "topk", expected: .topkSoftmax),
        Case(label: "top-k in Mixtral's order", router: "topk", gateOrder: "topk-softmax", expected: .topkSoftmax),
        Case(label: "top-k not renormalised", router: "topk", renormalize: false, expected: .softmaxTopk),
        // No capacity factor in the config: expert choice routes with 2, and the metadata must say so.
        Case(label: "expert choice", router: "expert-choice", expected: .expertChoice),
        Case(label: "Soft MoE", router: "soft", expected: .soft),
        Case(label: "SpheroMoE", router: "sphero", expected: .sphero),
    ]

    func config(_ c: Case) -> ViTConfig {
        var v = tinyConfig(router: c.router)
        v.moe!.gateOrder = c.gateOrder
        v.moe!.renormalize = c.renormalize
        v.moe!.capacityFactor = c.capacityFactor
        return v
    }

    func tempDir() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("router-names-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        return dir
    }

    /// A few plain SGD steps in training mode (noise, jitter, dropout as configured).
    func train(_ model: ViT, steps: Int) throws {
        let b = model.backend
        for step in 0..<steps {
            let (patches, labels) = try tinyBatch(b, model.config, batch: 4, seed: 100 + UInt64(step))
            let logits = try model.forward(patches: patches, training: true, step: step)
            let rowLoss = try b.zeros([4]), mean = try b.zeros([1]), dLogits = try b.zeros(logits.shape)
            try b.crossEntropy(logits: logits, labels: labels, labelSmoothing: 0, rowLoss: rowLoss, meanLoss: mean,
                               dLogits: dLogits, gradientScale: 1)
            try model.params.zeroGradients()
            try model.backward(dLogits: dLogits, patches: patches)
            for p in model.params.all { try b.axpy(-0.2, try p.gradient(), p.value) }
        }
    }

    /// Rows of a `[rows, width]` host array as float64 token vectors.
    func rows(_ v: [Float], width: Int) -> [[Double]] {
        (0..<(v.count / width)).map { r in (0..<width).map { Double(v[r * width + $0]) } }
    }

    /// The host implementation of MoE layer `layer` of a checkpoint, from the
    /// checkpoint alone: tensors, `moe-gpu.*` metadata and nothing else.
    func hostLayer(_ path: String, layer: Int) throws -> (MoELayerWeights, RoutingSettings) {
        let source = try SafetensorsCheckpoint(path: path)
        let d = try ArchitectureAdapter.describe(source)
        let settings = try XCTUnwrap(RoutingSettings(metadata: source.metadata), "no routing settings in \(path)")
        let m = try XCTUnwrap(d.moeLayers[layer], "layer \(layer) is not an MoE layer in \(path)")
        return (try MoELayerWeights.load(source, m, hidden: d.hidden, activation: d.activation), settings)
    }

    /// Host outputs for `x` (`batch` images of `tokens` rows): Soft MoE and
    /// SpheroMoE mix the tokens of one image, top-k and expert choice route all rows together.
    func hostForward(_ w: MoELayerWeights, _ s: RoutingSettings, _ x: [[Double]], batch: Int, tokens: Int) -> [[Double]] {
        guard s.router.isSoft else { return w.forward(x, settings: s).outputs }
        return (0..<batch).flatMap { i in w.forward(Array(x[i * tokens..<(i + 1) * tokens]), settings: s).outputs }
    }

    /// train -> save -> inspect -> verify -> load, for every router.
    func testRoundTripEveryRouter() throws {
        let dir = try tempDir()
        let b = CPUBackend()
        for c in Self.cases {
            let cfg = config(c)
            let model = try ViT(config: cfg, backend: b, seed: 21)
            try train(model, steps: 3)
            if let layer = model.blocks[1].ffn as? SoftMoELayer, let td = layer.tauDispatch, let tc = layer.tauCombine {
                // Temperatures as a longer run leaves them (three steps hardly move them):
                // the host must read them from the file, not from moe-gpu.sphero_tau.
                try td.value.write([0.3]); try tc.value.write([0.8])
            }
            let url = dir.appendingPathComponent("\(c.router)-\(c.gateOrder)-\(c.renormalize).safetensors")
            try ModelCheckpoint.save(model, to: url)

            // Metadata and inspect: the name, and the layer found (SpheroMoE used to be "0 MoE").
            let file = try SafetensorsFile(path: url.path)
            XCTAssertEqual(file.metadata["moe-gpu.router"], c.expected.rawValue, c.label)
            let summary = try CheckpointSummary(path: url.path)
            XCTAssertEqual(summary.description.moeLayers.keys.sorted(), [1], c.label)
            XCTAssertEqual(summary.routing?.router, c.expected, c.label)
            XCTAssertTrue(summary.text.contains("(1 dense MLP, 1 MoE)"), "\(c.label)\n\(summary.text)")
            XCTAssertTrue(summary.text.contains("routing       \(c.expected.rawValue)"), "\(c.label)\n\(summary.text)")
            XCTAssertTrue(summary.text.contains("trained by    moe-gpu train"), "\(c.label)\n\(summary.text)")
            if c.expected.isSphero {
                // One core expert at full width, two universal ones at half (tinyConfig), two slots each.
                XCTAssertTrue(summary.text.contains("MoE: 3 experts (1 x width 16, 2 universal x width 8), 6 slots"), "\(c.label)\n\(summary.text)")
            } else if c.expected.isSoft {
                XCTAssertTrue(summary.text.contains("MoE: 3 experts x width 16, 6 slots"), "\(c.label)\n\(summary.text)")
            } else {
                XCTAssertTrue(summary.text.contains("MoE: 3 experts x width 16"), "\(c.label)\n\(summary.text)")
            }
            if c.expected.isExpertChoice {
                XCTAssertEqual(summary.routing?.capacityFactor, 2, "expert choice routes with its default factor, not dropless")
                XCTAssertFalse(summary.text.contains("dropless"), summary.text)
            }

            // Verify: the host implementation, built from the file alone, computes the
            // trained layer's outputs on the same input. The input is neither centred
            // nor normalised, so a LayerNorm inside the host SpheroMoE would show.
            let (weights, settings) = try hostLayer(url.path, layer: 1)
            let batch = 3, tokens = cfg.tokens, width = cfg.width
            var rng = SplitMix64(seed: 7)
            let xv = (0..<(batch * tokens * width)).map { i in Float(rng.nextGaussian()) * 1.5 + Float(i % width) * 0.25 }
            let x = try b.tensor(xv, shape: [batch * tokens, width]), out = try b.zeros([batch * tokens, width])
            try model.blocks[1].ffn.forward(x, batch: batch, tokens: tokens, into: out, training: false, step: 0)
            let trained = try out.floats().map(Double.init)
            let host = hostForward(weights, settings, rows(xv, width: width), batch: batch, tokens: tokens).flatMap { $0 }
            XCTAssertLessThan(Reference.relativeError(host, trained), 1e-5, "\(c.label): host layer vs trained layer")
            if c.expected.isSphero {
                // Trained temperatures come from the file, not the metadata's initial value.
                XCTAssertEqual(try XCTUnwrap(weights.tauDispatch), 0.3, accuracy: 1e-7)
                XCTAssertEqual(try XCTUnwrap(weights.tauCombine), 0.8, accuracy: 1e-7)
                XCTAssertEqual(settings.spheroTau, 0.5)
                XCTAssertEqual(weights.slotsPerExpert, 2)
                var untrained = weights
                untrained.tauDispatch = nil; untrained.tauCombine = nil
                let atInit = hostForward(untrained, settings, rows(xv, width: width), batch: batch, tokens: tokens).flatMap { $0 }
                XCTAssertGreaterThan(Reference.relativeError(atInit, trained), 1e-3)
            }
            // The name matters: another definition of the same family gives other outputs.
            let other: RouterKind? = c.expected == .topkSoftmax ? .softmaxTopk : c.expected == .softmaxTopk ? .topkSoftmax
                : c.expected == .sphero ? .soft : c.expected == .soft ? .sphero : nil
            if let other {
                var s2 = settings
                s2.router = other
                let wrong = hostForward(weights, s2, rows(xv, width: width), batch: batch, tokens: tokens).flatMap { $0 }
                XCTAssertGreaterThan(Reference.relativeError(wrong, trained), 1e-3, "\(c.label) read as \(other.rawValue)")
            }

            // Load: a fresh inference model from the file gives the same logits.
            let (patches, _) = try tinyBatch(b, cfg, batch: 2, seed: 5)
            let before = try model.forward(patches: patches, training: false, step: 0).floats()
            let loaded = try ViT(config: try ModelCheckpoint.config(at: url.path), backend: b, seed: 99, training: false)
            XCTAssertEqual(loaded.config, cfg)
            try ModelCheckpoint.load(url.path, into: loaded)
            XCTAssertEqual(try loaded.forward(patches: patches, training: false, step: 0).floats(), before, c.label)
        }
    }

    /// (a) Old checkpoints: `moe-gpu train` used to label a renormalised top-k
    /// `softmax-topk` (and record 0 for expert choice's default capacity factor).
    /// Their training config decides: they read as `topk-softmax` (and 2), and load.
    func testOldMetadataMapsThroughTheTrainingConfig() throws {
        let dir = try tempDir()
        let b = CPUBackend()
        for (c, oldLabel, oldFactor) in [(Self.cases[0], "softmax-topk", "0.0"), (Self.cases[3], "expert-choice", "0.0")] {
            let cfg = config(c)
            let model = try ViT(config: cfg, backend: b, seed: 3)
            let url = dir.appendingPathComponent("new-\(c.router).safetensors"), old = dir.appendingPathComponent("old-\(c.router).safetensors")
            try ModelCheckpoint.save(model, to: url)
            // Rewrite the file with the metadata the previous version wrote.
            let file = try SafetensorsFile(path: url.path)
            var meta = file.metadata
            meta["moe-gpu.router"] = oldLabel
            meta["moe-gpu.capacity_factor"] = oldFactor
            let tensors: [(name: String, dtype: StorageDType, shape: [Int], data: Data)] = try file.entries.map {
                (name: $0.name, dtype: .F32, shape: $0.shape, data: encodeFloats(try file.floats($0.name), as: .F32))
            }
            try writeSafetensors(to: old, tensors: tensors, metadata: meta)
            let s = try XCTUnwrap(RoutingSettings(metadata: try SafetensorsFile(path: old.path).metadata))
            XCTAssertEqual(s.router, c.expected, c.label)
            XCTAssertEqual(s.capacityFactor, c.expected.isExpertChoice ? 2 : 0, c.label)
            XCTAssertTrue(try CheckpointSummary(path: old.path).text.contains("routing       \(c.expected.rawValue)"), c.label)
            let loaded = try ViT(config: try ModelCheckpoint.config(at: old.path), backend: b, seed: 4, training: false)
            try ModelCheckpoint.load(old.path, into: loaded)
            let (patches, _) = try tinyBatch(b, cfg, batch: 2, seed: 5)
            XCTAssertEqual(try loaded.forward(patches: patches, training: false, step: 0).floats(),
                           try model.forward(patches: patches, training: false, step: 0).floats(), c.label)
        }
        // Upcycled files have no training config: the label is the definition.
        XCTAssertEqual(RoutingSettings(metadata: ["moe-gpu.format": "moe", "moe-gpu.router": "softmax-topk",
                                                  "moe-gpu.num_experts": "4", "moe-gpu.top_k": "2"])?.router, .softmaxTopk)
    }

    /// The language model writes the same names (and old LM checkpoints, written
    /// without `moe-gpu.router`, are read from their training config).
    func testLanguageModelRouterNames() throws {
        for (renormalize, expected) in [(true, RouterKind.topkSoftmax), (false, .softmaxTopk)] {
            var c = tinyLM(moe: "topk")
            c.moe!.renormalize = renormalize
            let model = try LlamaModel(config: c, backend: CPUBackend(), seed: 1, sequenceLength: 4, training: false)
            var m = try model.checkpointMetadata
            XCTAssertEqual(m["moe-gpu.router"], expected.rawValue)
            XCTAssertEqual(RoutingSettings(metadata: m)?.router, expected)
            m["moe-gpu.router"] = nil
            XCTAssertEqual(RoutingSettings(metadata: m)?.router, expected, "from moe-gpu.lm_config")
        }
        let ec = try LlamaModel(config: tinyLM(moe: "expert-choice"), backend: CPUBackend(), seed: 1, sequenceLength: 4, training: false)
        XCTAssertEqual(try ec.checkpointMetadata["moe-gpu.router"], "expert-choice")
    }

    /// Every training config maps to one name, and the name's properties give the config back.
    func testNamesAndTrainingConfigsAgree() throws {
        XCTAssertEqual(RouterKind.allCases.map(\.rawValue), ["topk-softmax", "softmax-topk", "expert-choice", "soft", "sphero"])
        for k in RouterKind.allCases {
            let back = RouterKind(trainingRouter: k.trainingRouter, gateOrder: k.gateOrder ?? "softmax-topk", renormalize: k.renormalizes)
            XCTAssertEqual(back, k)
            var m = MoEConfig()
            m.router = k.trainingRouter; m.gateOrder = k.gateOrder ?? m.gateOrder; m.renormalize = k.renormalizes
            XCTAssertEqual(RouterKind(moe: m), k)
            XCTAssertEqual(m.routerName, k.rawValue)
        }
        XCTAssertEqual(RouterKind(trainingRouter: "topk", gateOrder: "softmax-topk", renormalize: true), .topkSoftmax)
        XCTAssertEqual(RouterKind(trainingRouter: "topk", gateOrder: "topk-softmax", renormalize: false), .topkSoftmax)
        XCTAssertNil(RouterKind(trainingRouter: "dense", gateOrder: "softmax-topk", renormalize: true))
        XCTAssertEqual(RouterKind.allCases.filter(\.renormalizes), [.topkSoftmax])
    }

    /// (b) Expert choice combines with the token-expert probability itself
    /// (Zhou et al. 2022), as the `expertChoice` op does: not renormalised per token.
    func testExpertChoiceCombineWeightsAreTheRouterProbabilities() throws {
        // Capacity ceil(1 * 2 / 2) = 1: expert 0 takes token 0, expert 1 takes token 1.
        let r = MoEMath.route([[2, 0], [1, 0]], kind: .expertChoice, topK: 1, capacityFactor: 1)
        XCTAssertEqual(r[0].map(\.0), [0])
        XCTAssertEqual(r[1].map(\.0), [1])
        XCTAssertEqual(r[0][0].1, 1 / (1 + exp(-2)), accuracy: 1e-12)
        XCTAssertEqual(r[1][0].1, 1 / (1 + exp(1)), accuracy: 1e-12)
        // On random logits, the same weights as the op's float64 reference.
        var rng = SplitMix64(seed: 2)
        let T = 13, E = 5
        let logits = (0..<T).map { _ in (0..<E).map { _ in Double(rng.nextGaussian()) } }
        let probs = logits.flatMap { l -> [Double] in let m = l.max()!; let e = l.map { exp($0 - m) }; let s = e.reduce(0, +); return e.map { $0 / s } }
        let capacity = ExpertChoice.capacity(tokens: T, experts: E, factor: 2)
        let op = Reference.expertChoice(probs: probs, tokens: T, experts: E, capacity: capacity).combineWeight
        let host = MoEMath.route(logits, kind: .expertChoice, topK: 1, capacityFactor: 2)
        var fromHost = [Double](repeating: 0, count: T * E)
        for t in 0..<T { for (e, w) in host[t] { fromHost[t * E + e] = w } }
        XCTAssertLessThan(zip(fromHost, op).map { abs($0 - $1) }.max()!, 1e-12)
    }
}
