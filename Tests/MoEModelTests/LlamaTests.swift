import Foundation
import MoECheckpoint
import MoECompute
@testable import MoEModel
import XCTest
import MoETestSupport

/// A tiny Llama: grouped-query attention (2 query heads per kv head), a vocabulary
/// and widths that are not multiples of any tile.
func tinyLM(moe router: String? = nil, experts: Int = 3, topK: Int = 2, widthRatio: Double = 1) -> LMConfig {
    var c = LMConfig()
    c.vocabSize = 11; c.hidden = 8; c.intermediate = 12; c.layers = 2; c.heads = 2; c.kvHeads = 1
    c.ropeTheta = 100; c.maxPositions = 16; c.tieEmbeddings = false
    if let router {
        var m = MoEConfig()
        m.router = router; m.experts = experts; m.topK = topK; m.expertWidthRatio = widthRatio
        m.capacityFactor = router == "expert-choice" ? 2 : nil
        m.auxLossCoefficient = 0.01; m.zLossCoefficient = 0.001
        c.moe = m; c.moeLayers = [1]
    }
    return c
}

func tokenBatch(_ backend: Backend, _ c: LMConfig, batch: Int, tokens: Int, seed: UInt64) throws -> (inputs: Tensor, labels: Tensor) {
    var rng = SplitMix64(seed: seed)
    let ids = (0..<(batch * tokens)).map { _ in Int32(rng.next() % UInt64(c.vocabSize)) }
    // Every fourth target ignored, as padding and masked prompts are.
    let labels = (0..<(batch * tokens)).map { i in i % 4 == 3 ? -100 : Int32(rng.next() % UInt64(c.vocabSize)) }
    return (try backend.tensor(ints: ids, shape: [batch, tokens]), try backend.tensor(ints: labels, shape: [batch * tokens]))
}

/// Mean next-token cross-entropy plus the weighted auxiliary losses; optionally the gradients.
func lmLoss(_ model: LlamaModel, _ inputs: Tensor, _ labels: Tensor, backward: Bool) throws -> Float {
    let b = model.backend, rows = labels.count
    let logits = try model.forward(inputs, training: false, step: 1)
    let rowLoss = try b.zeros([rows]), mean = try b.zeros([1]), dLogits = try b.zeros(logits.shape)
    try b.crossEntropy(logits: logits, labels: labels, labelSmoothing: 0, rowLoss: rowLoss, meanLoss: mean,
                       dLogits: dLogits, gradientScale: 1)
    var aux: Float = 0
    for l in model.layers { aux += try l.ffn.auxiliaryLosses().values.reduce(0, +) }
    if backward {
        try model.params.zeroGradients()
        try model.backward(dLogits: dLogits, inputs: inputs, lossScale: 1)
    }
    return try mean.floats()[0] + aux
}

/// The Llama forward in float64 on the host, from the Hugging Face definition:
/// RMSNorm, rotate_half RoPE, causal GQA softmax attention, SwiGLU MLP or top-k MoE.
func referenceLogits(_ model: LlamaModel, ids: [Int32], batch: Int, tokens: Int) throws -> [Double] {
    let c = model.config, d = c.hidden, hd = c.resolvedHeadDim, V = c.vocabSize
    var w: [String: [Double]] = [:]
    for t in model.checkpointTensors { w[t.name] = try t.value().floats().map(Double.init) }
    func linear(_ x: [Double], _ name: String, out: Int) -> [Double] {
        let W = w[name]!, n = x.count / (W.count / out)
        let inF = W.count / out
        var y = [Double](repeating: 0, count: n * out)
        for r in 0..<n { for o in 0..<out { var s = 0.0; for i in 0..<inF { s += x[r * inF + i] * W[o * inF + i] }; y[r * out + o] = s } }
        return y
    }
    func rms(_ x: [Double], _ name: String) -> [Double] {
        let g = w[name]!
        var y = x
        for r in 0..<(x.count / d) {
            var ss = 0.0
            for i in 0..<d { ss += x[r * d + i] * x[r * d + i] }
            let s = 1 / (ss / Double(d) + Double(c.rmsNormEps)).squareRoot()
            for i in 0..<d { y[r * d + i] = x[r * d + i] * s * g[i] }
        }
        return y
    }
    func silu(_ v: Double) -> Double { v / (1 + exp(-v)) }
    func mlp(_ x: [Double], _ p: String, width: Int) -> [Double] {
        let g = linear(x, p + "gate_proj.weight", out: width), u = linear(x, p + "up_proj.weight", out: width)
        return linear(zip(g, u).map { silu($0) * $1 }, p + "down_proj.weight", out: d)
    }
    let inv = c.rotary.inverseFrequencies().map(Double.init)
    func rope(_ x: inout [Double], heads: Int) {
        for r in 0..<(batch * tokens) {
            let pos = Double(r % tokens)
            for h in 0..<heads {
                let base = r * heads * hd + h * hd
                for i in 0..<(hd / 2) {
                    let a = x[base + i], b = x[base + i + hd / 2], th = Double(Float(pos) * Float(inv[i]))
                    x[base + i] = a * cos(th) - b * sin(th)
                    x[base + i + hd / 2] = b * cos(th) + a * sin(th)
                }
            }
        }
    }
    let E = w["model.embed_tokens.weight"]!
    var x = ids.flatMap { Array(E[(Int($0) * d)..<((Int($0) + 1) * d)]) }
    for l in 0..<c.layers {
        let p = "model.layers.\(l)."
        let n1 = rms(x, p + "input_layernorm.weight")
        var q = linear(n1, p + "self_attn.q_proj.weight", out: c.heads * hd)
        var k = linear(n1, p + "self_attn.k_proj.weight", out: c.kvHeads * hd)
        let v = linear(n1, p + "self_attn.v_proj.weight", out: c.kvHeads * hd)
        rope(&q, heads: c.heads); rope(&k, heads: c.kvHeads)
        var o = [Double](repeating: 0, count: batch * tokens * c.heads * hd)
        for b in 0..<batch {
            for h in 0..<c.heads {
                let kh = h / (c.heads / c.kvHeads)
                for i in 0..<tokens {
                    let qi = (b * tokens + i) * c.heads * hd + h * hd
                    var s = (0...i).map { j -> Double in
                        let kj = (b * tokens + j) * c.kvHeads * hd + kh * hd
                        return (0..<hd).reduce(0.0) { $0 + q[qi + $1] * k[kj + $1] } / Double(hd).squareRoot()
                    }
                    let m = s.max()!
                    s = s.map { exp($0 - m) }
                    let z = s.reduce(0, +)
                    for j in 0...i {
                        let vj = (b * tokens + j) * c.kvHeads * hd + kh * hd
                        for e in 0..<hd { o[qi + e] += s[j] / z * v[vj + e] }
                    }
                }
            }
        }
        let attn = linear(o, p + "self_attn.o_proj.weight", out: d)
        let mid = zip(x, attn).map(+)
        let n2 = rms(mid, p + "post_attention_layernorm.weight")
        var f: [Double]
        if c.moeLayers.contains(l), let moe = c.moe {
            let mp = p + "block_sparse_moe."
            let logits = linear(n2, mp + "gate.weight", out: moe.experts)
            f = [Double](repeating: 0, count: n2.count)
            for r in 0..<(batch * tokens) {
                let z = logits[(r * moe.experts)..<((r + 1) * moe.experts)]
                let mx = z.max()!, ex = z.map { exp($0 - mx) }, sum = ex.reduce(0, +)
                let probs = ex.map { $0 / sum }
                let top = probs.indices.sorted { probs[$0] != probs[$1] ? probs[$0] > probs[$1] : $0 < $1 }.prefix(moe.topK)
                let norm = moe.renormalize ? top.reduce(0.0) { $0 + probs[$1] } : 1
                let row = Array(n2[(r * d)..<((r + 1) * d)])
                for e in top {
                    let ep = mp + "experts.\(e)."
                    let g = linear(row, ep + "w1.weight", out: c.expertIntermediate), u = linear(row, ep + "w3.weight", out: c.expertIntermediate)
                    let y = linear(zip(g, u).map { silu($0) * $1 }, ep + "w2.weight", out: d)
                    for i in 0..<d { f[r * d + i] += probs[e] / norm * y[i] }
                }
            }
        } else {
            f = mlp(n2, p + "mlp.", width: c.intermediate)
        }
        x = zip(mid, f).map(+)
    }
    let normed = rms(x, "model.norm.weight")
    return linear(normed, c.tieEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight", out: V)
}

final class LlamaModelTests: XCTestCase {
    func checkAgainstReference(_ c: LMConfig, backend: Backend) throws {
        let model = try LlamaModel(config: c, backend: backend, seed: 5, training: false)
        // Spread the router logits so no token sits at a near-tie of the top-k.
        for p in model.params.all where p.name.hasSuffix("gate.weight") { try backend.scale(p.value, by: 50) }
        let (inputs, _) = try tokenBatch(backend, c, batch: 2, tokens: 7, seed: 1)
        let got = try model.forward(inputs, training: false, step: 0).floats()
        let want = try referenceLogits(model, ids: try inputs.ints(), batch: 2, tokens: 7)
        assertRelativeError(got, want, below: 1e-5, "tiny Llama logits on \(backend.name)")
    }

    func testDenseForwardMatchesFloat64Reference() throws { try checkAgainstReference(tinyLM(), backend: CPUBackend()) }
    func testMoEForwardMatchesFloat64Reference() throws { try checkAgainstReference(tinyLM(moe: "topk"), backend: CPUBackend()) }
    func testTiedForwardMatchesFloat64Reference() throws {
        var c = tinyLM(); c.tieEmbeddings = true
        try checkAgainstReference(c, backend: CPUBackend())
    }
    func testForwardMatchesFloat64ReferenceOnOpenCL() throws {
        let backend = try TestBackends.openCLOrSkip()
        try checkAgainstReference(tinyLM(), backend: backend)
        try checkAgainstReference(tinyLM(moe: "topk"), backend: backend)
    }

    /// Directional derivatives of the whole model's loss against central finite differences.
    func checkGradients(_ c: LMConfig, backend: Backend) throws {
        let model = try LlamaModel(config: c, backend: backend, seed: 7)
        for p in model.params.all where p.name.hasSuffix("gate.weight") { try backend.scale(p.value, by: 50) }
        let (inputs, labels) = try tokenBatch(backend, c, batch: 2, tokens: 6, seed: 4)
        _ = try lmLoss(model, inputs, labels, backward: true)
        var rng = SplitMix64(seed: 99)
        for p in model.params.all {
            let g = try p.grad!.floats(), original = try p.value.floats()
            let v = (0..<p.count).map { _ in rng.nextFloat(in: -1...1) }
            let analytic = zip(g, v).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
            func loss(_ eps: Float) throws -> Double {
                try p.value.write(zip(original, v).map { $0 + eps * $1 })
                return Double(try lmLoss(model, inputs, labels, backward: false))
            }
            let eps: Float = 1e-3
            let coarse = (try loss(eps) - loss(-eps)) / Double(2 * eps)
            let fine = (try loss(eps / 2) - loss(-eps / 2)) / Double(eps)
            let numeric = (4 * fine - coarse) / 3
            try p.value.write(original)
            XCTAssertLessThan(abs(numeric - analytic) / (2e-2 * abs(numeric) + 6e-4), 1,
                              "\(backend.name) \(p.name): analytic \(analytic) vs finite difference \(numeric)")
        }
    }

    func testDenseGradients() throws { try checkGradients(tinyLM(), backend: CPUBackend()) }
    func testTiedGradients() throws {
        var c = tinyLM(); c.tieEmbeddings = true
        try checkGradients(c, backend: CPUBackend())
    }
    func testMoEGradients() throws { try checkGradients(tinyLM(moe: "topk"), backend: CPUBackend()) }
    func testExpertChoiceGradients() throws { try checkGradients(tinyLM(moe: "expert-choice"), backend: CPUBackend()) }
    func testGradientsOnOpenCL() throws {
        let backend = try TestBackends.openCLOrSkip()
        try checkGradients(tinyLM(), backend: backend)
        try checkGradients(tinyLM(moe: "topk"), backend: backend)
    }

    /// Online upcycling from a dense checkpoint file: replicate (top-2 of 3 copies)
    /// and granular (2 copies x 2 shards, top-2) start as the dense model.
    func checkUpcycleKeepsLogits(_ method: LMUpcycleMethod, experts: Int, topK: Int, granularity: Int, backend: Backend) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lm-upcycle-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let dense = try LlamaModel(config: tinyLM(), backend: backend, seed: 3, training: false)
        let file = dir.appendingPathComponent("dense.safetensors")
        try ModelCheckpoint.save(dense, to: file)
        var c = tinyLM(moe: "topk", experts: experts, topK: topK, widthRatio: 1 / Double(granularity))
        c.moeLayers = [0, 1]
        let moe = try LlamaModel(config: c, backend: backend, seed: 9, training: false)
        let (source, stored) = try LlamaCheckpoint.open(file.path)
        XCTAssertEqual(stored, tinyLM())
        let log = try LlamaCheckpoint.load(source, into: moe, upcycle: LMUpcycleOptions(method: method, granularity: granularity, seed: 1))
        XCTAssertEqual(log.count, 2)
        let (inputs, _) = try tokenBatch(backend, c, batch: 2, tokens: 7, seed: 8)
        let want = try dense.forward(inputs, training: false, step: 0).floats()
        let got = try moe.forward(inputs, training: false, step: 0).floats()
        assertRelativeError(got, want.map(Double.init), below: 1e-5, "\(method) upcycle logits")
    }

    func testReplicateUpcycleKeepsLogits() throws {
        try checkUpcycleKeepsLogits(.replicate, experts: 3, topK: 2, granularity: 1, backend: CPUBackend())
    }
    func testGranularUpcycleKeepsLogits() throws {
        try checkUpcycleKeepsLogits(.granular, experts: 4, topK: 2, granularity: 2, backend: CPUBackend())
    }

    /// save -> load gives the same logits, and the file uses Mixtral's tensor names.
    func testCheckpointRoundTripUsesMixtralNames() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lm-ckpt-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let c = tinyLM(moe: "topk")
        let backend = CPUBackend()
        let a = try LlamaModel(config: c, backend: backend, seed: 1, training: false)
        let file = dir.appendingPathComponent("m.safetensors")
        try ModelCheckpoint.save(a, to: file)
        let names = Set(try SafetensorsFile(path: file.path).entries.map(\.name))
        for n in ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.2.w3.weight",
                  "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"] {
            XCTAssertTrue(names.contains(n), n)
        }
        let (source, stored) = try LlamaCheckpoint.open(file.path)
        XCTAssertEqual(stored, c)
        let b = try LlamaModel(config: stored, backend: backend, seed: 2, training: false)
        try LlamaCheckpoint.load(source, into: b)
        let (inputs, _) = try tokenBatch(a.backend, c, batch: 1, tokens: 5, seed: 3)
        XCTAssertEqual(try a.forward(inputs, training: false, step: 0).floats(), try b.forward(inputs, training: false, step: 0).floats())
    }
}

final class GenerationTests: XCTestCase {
    /// Each step's logits from the KV cache equal the last row of a full forward
    /// over the whole sequence so far.
    func checkCacheMatchesRecompute(_ c: LMConfig, backend: Backend) throws {
        let model = try LlamaModel(config: c, backend: backend, seed: 21, training: false)
        for p in model.params.all where p.name.hasSuffix("gate.weight") { try backend.scale(p.value, by: 50) }
        let cache = try KVCache(model: model, capacity: 12)
        var ids: [Int32] = [3, 1, 4, 1, 5]
        var logits = try model.decode(ids, cache: cache).floats()
        var sampler = Sampler()
        for step in 0..<6 {
            let full = try model.forward(try backend.tensor(ints: ids, shape: [1, ids.count]), training: false, step: 0).floats()
            let last = Array(full[((ids.count - 1) * c.vocabSize)...])
            assertRelativeError(logits, last.map(Double.init), below: 1e-5, "\(backend.name) step \(step): cached vs recomputed logits")
            let next = sampler.next(logits)
            ids.append(next)
            logits = try model.decode([next], cache: cache).floats()
        }
        XCTAssertEqual(cache.length, ids.count)
        XCTAssertThrowsError(try model.decode([Int32](repeating: 1, count: 2), cache: cache))
    }

    func testCacheMatchesRecompute() throws {
        try checkCacheMatchesRecompute(tinyLM(), backend: CPUBackend())
        try checkCacheMatchesRecompute(tinyLM(moe: "topk"), backend: CPUBackend())
    }
    func testCacheMatchesRecomputeOnOpenCL() throws {
        let backend = try TestBackends.openCLOrSkip()
        try checkCacheMatchesRecompute(tinyLM(), backend: backend)
        try checkCacheMatchesRecompute(tinyLM(moe: "topk"), backend: backend)
    }

    func testSamplerIsSeededAndRespectsTopP() {
        let logits: [Float] = [2, 1.9, -5, 0.5]
        var a = Sampler(temperature: 0.8, topP: 0.9, seed: 4), b = Sampler(temperature: 0.8, topP: 0.9, seed: 4)
        let x = (0..<50).map { _ in a.next(logits) }, y = (0..<50).map { _ in b.next(logits) }
        XCTAssertEqual(x, y)
        XCTAssertFalse(x.contains(2), "top-p 0.9 never samples the 0.1% token")
        var greedy = Sampler()
        XCTAssertEqual(greedy.next(logits), 0)
    }
}

final class LMCheckpointErrorTests: XCTestCase {
    /// A Hugging Face Mixtral folder whose expert 1 is narrower than the others.
    func testMixtralWhoseExpertsDisagreeInShape() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mixtral-bad-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        var c = tinyLM(moe: "topk", experts: 3)
        c.moeLayers = [0, 1]
        let model = try LlamaModel(config: c, backend: CPUBackend(), seed: 1, training: false)
        var tensors: [(name: String, dtype: StorageDType, shape: [Int], data: Data)] = []
        for t in model.checkpointTensors {
            var shape = t.shape, values = try t.value().floats()
            if t.name == "model.layers.1.block_sparse_moe.experts.1.w1.weight" { shape[0] -= 2; values.removeLast(2 * shape[1]) }
            tensors.append((t.name, .F32, shape, encodeFloats(values, as: .F32)))
        }
        try writeSafetensors(to: dir.appendingPathComponent("model.safetensors"), tensors: tensors, metadata: ["format": "pt"])
        let config = """
            {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 11,
             "num_local_experts": 3, "num_experts_per_tok": 2, "rope_theta": 100.0, "rms_norm_eps": 1e-05,
             "max_position_embeddings": 16, "tie_word_embeddings": false}
            """
        try Data(config.utf8).write(to: dir.appendingPathComponent("config.json"))
        let (source, stored) = try LlamaCheckpoint.open(dir.path)
        XCTAssertEqual(stored.moe?.experts, 3)
        XCTAssertEqual(stored.moeLayers, [0, 1])
        let target = try LlamaModel(config: stored, backend: CPUBackend(), seed: 1, training: false, initialize: false)
        XCTAssertThrowsError(try LlamaCheckpoint.load(source, into: target)) { e in
            XCTAssertTrue("\(e)".contains("experts.1.w1.weight has shape [10, 8], the model needs [12, 8]"), "\(e)")
        }
    }

    func testUnknownArchitectureInConfig() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bert-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try writeSafetensors(to: dir.appendingPathComponent("model.safetensors"),
                             tensors: [("embeddings.word_embeddings.weight", .F32, [2, 2], encodeFloats([1, 2, 3, 4], as: .F32))], metadata: [:])
        try Data(#"{"model_type": "bert", "hidden_size": 2}"#.utf8).write(to: dir.appendingPathComponent("config.json"))
        XCTAssertThrowsError(try LlamaCheckpoint.open(dir.path)) { e in
            XCTAssertTrue("\(e)".contains("is a \"bert\" model"), "\(e)")
        }
    }
}

final class RecycleTests: XCTestCase {
    /// Recycling (MoE Jetpack): every expert takes half the dense neurons, sampled by
    /// the activation norms of calibration windows; its rows are the dense rows it took.
    func testRecycleTakesDistinctDenseNeuronsByImportance() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lm-recycle-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let backend = CPUBackend()
        let dense = try LlamaModel(config: tinyLM(), backend: backend, seed: 3, training: false)
        let file = dir.appendingPathComponent("dense.safetensors")
        try ModelCheckpoint.save(dense, to: file)
        let corpus = try TokenizedCorpus(tokens: (0..<200).map { Int32($0 * 7 % 11) }, padID: 0)
        let windows = try LMBatchSource(corpus, seqLen: 8)
        let source = try openCheckpoint(path: file.path)
        let importance = try LMRecipe.neuronImportance(source: source, dense: tinyLM(), windows: windows, count: 64, backend: backend)
        XCTAssertEqual(importance.keys.sorted(), [0, 1])
        XCTAssertTrue(importance[1]!.allSatisfy { $0 > 0 })
        var c = tinyLM(moe: "topk", experts: 3, topK: 2, widthRatio: 0.5)
        c.moeLayers = [0, 1]
        let moe = try LlamaModel(config: c, backend: backend, seed: 9, training: false, initialize: false)
        var options = LMUpcycleOptions(method: .recycle, seed: 2)
        options.importance = importance
        try LlamaCheckpoint.load(source, into: moe, upcycle: options)
        let gate = try source.floats("model.layers.1.mlp.gate_proj.weight"), d = c.hidden
        let denseRows = (0..<c.intermediate).map { Array(gate[($0 * d)..<(($0 + 1) * d)]) }
        for t in moe.checkpointTensors where t.name.hasPrefix("model.layers.1.block_sparse_moe.experts.") && t.name.hasSuffix("w1.weight") {
            let v = try t.value().floats()
            let picked = (0..<(v.count / d)).map { r in denseRows.firstIndex(of: Array(v[(r * d)..<((r + 1) * d)])) }
            XCTAssertEqual(picked.count, 6, t.name)
            XCTAssertFalse(picked.contains(nil), "\(t.name) has a row that is no dense neuron")
            XCTAssertEqual(Set(picked.compactMap { $0 }).count, 6, "\(t.name) took a neuron twice")
            XCTAssertEqual(picked.compactMap { $0 }, picked.compactMap { $0 }.sorted())
        }
    }
}
