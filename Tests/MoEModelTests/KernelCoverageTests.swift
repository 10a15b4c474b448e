import Foundation
import MoECompute
@testable import MoEModel
import MoETokenizer
import XCTest
import MoETestSupport

/// Every kernel of Kernels/*.cl on tiny shapes, in a few seconds on PoCL: the
/// workload `scripts/oclgrind.sh` runs under oclgrind's race and
/// uninitialized-memory checks in CI. Two backends on the same device: the CPU
/// device's kernel shapes (row-wise reductions, `gemm_cpu`) and the GPU ones
/// (work-group reductions, the tiled `gemm`), training a ViT with every router
/// and a Llama and a Mixtral-style decoder for one step and evaluating them,
/// compared with the CPU backend. The test fails on a kernel nobody ran.
final class KernelCoverageTests: XCTestCase {
    /// Kernels/*.cl's `__kernel` names.
    static func declaredKernels() throws -> Set<String> {
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Kernels").standardized
        var names = Set<String>()
        for file in try FileManager.default.contentsOfDirectory(atPath: dir.path) where file.hasSuffix(".cl") {
            let text = try String(contentsOf: dir.appendingPathComponent(file), encoding: .utf8)
            // `__kernel [__attribute__((...))] void NAME(`
            let pattern = try NSRegularExpression(pattern: #"__kernel\s+(?:__attribute__\(\(.*?\)\)\s+)?void\s+(\w+)\s*\("#)
            for m in pattern.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                names.insert(String(text[Range(m.range(at: 1), in: text)!]))
            }
        }
        return names
    }

    static func tinyImages(count: Int, seed: UInt64) throws -> ImageDataset {
        var rng = SplitMix64(seed: seed)
        let pixels = (0..<(count * 8 * 8)).map { _ in UInt8(rng.nextFloat(in: 0...255)) }
        let labels = (0..<count).map { Int32($0 % 4) }
        return try ImageDataset(images: pixels, labels: labels, channels: 1, height: 8, width: 8, classes: 4)
    }

    static func vitConfig(router: String?) -> TrainConfig {
        var c = TrainConfig()
        c.model.imageSize = 8; c.model.channels = 1; c.model.patchSize = 4; c.model.classes = 4
        c.model.width = 8; c.model.depth = 2; c.model.heads = 2; c.model.mlpRatio = 2
        c.model.pool = router == nil ? "cls" : "mean"
        if let router {
            c.model.moeBlocks = [1]
            var m = Recipe.moe(router: router, experts: 4)
            m.experts = 4
            if router == "topk" { m.jitter = 0.01; m.capacityFactor = 1.25 }   // jitter noise, dropped tokens
            m.dropout = 0.1; m.stochasticDepth = 0.1
            c.model.moe = m
        }
        c.batchSize = 3; c.steps = 1; c.warmupSteps = 0; c.learningRate = 1e-3; c.clipNorm = 1e-3
        c.augment = false; c.evalEvery = 0; c.testExamples = 5
        return c
    }

    static func lmConfig(moe: Bool) -> TrainConfig {
        var t = smallLMTrainConfig(moe: moe, hidden: 16, intermediate: 24)
        t.seqLen = 6; t.batchSize = 2; t.steps = 1; t.warmupSteps = 0; t.learningRate = 1e-3
        t.labelSmoothing = 0.1; t.testExamples = 2
        return t
    }

    /// Two steps and an evaluation: the losses and the evaluation loss.
    static func run(_ c: TrainConfig, backend: Backend) throws -> [Double] {
        let trainer: Trainer
        if let lm = c.lm {
            let corpus = try TokenizedCorpus(documents: [.text("To be, or not to be, that is the question.")], tokenizer: ByteTokenizer())
            let model = try LlamaModel(config: lm, backend: backend, seed: 3, sequenceLength: c.seqLen)
            trainer = try Trainer(config: c, model: model, train: try LMBatchSource(corpus, seqLen: c.seqLen),
                                  test: try LMBatchSource(corpus, seqLen: c.seqLen))
        } else {
            let model = try ViT(config: c.model, backend: backend, seed: 3)
            trainer = try Trainer(config: c, model: model, train: try tinyImages(count: 12, seed: 1), test: try tinyImages(count: 5, seed: 2))
        }
        var out = try (0..<c.steps).map { _ in Double(try trainer.trainStep().loss) }
        out.append(try trainer.evaluateWithLoss().loss)
        return out
    }

    func testOpenCLTinyWorkloadsRunEveryKernel() throws {
        let shared = try TestBackends.openCLOrSkip()
        // Small tiles and groups whatever the device: oclgrind interprets every work-item.
        var cpuShapes = KernelTuning(for: shared.device)
        cpuShapes.cpuGemm = true; cpuShapes.cpuShapes = true; cpuShapes.cpuRows = 3; cpuShapes.cpuVecs = 1
        cpuShapes.elementwiseGroup = 64
        var gpuShapes = cpuShapes
        gpuShapes.cpuGemm = false; gpuShapes.cpuShapes = false
        gpuShapes.gemm = .init(tileM: 16, tileN: 16, tileK: 8, wptM: 2, wptN: 2)
        let declared = try Self.declaredKernels()
        XCTAssertGreaterThan(declared.count, 50, "the kernel name pattern found \(declared.count) kernels")

        var launched = Set<String>()
        let workloads: [(String, TrainConfig)] = [nil, "topk", "expert-choice", "soft", "sphero"].map { ("vit \($0 ?? "dense")", Self.vitConfig(router: $0)) }
            + [("llama", Self.lmConfig(moe: false)), ("mixtral", Self.lmConfig(moe: true))]
        // The GPU shapes differ in GEMM and reductions only: two workloads reach them all.
        let passes: [(String, KernelTuning, Int?, Set<String>)] = [
            ("cpu shapes", cpuShapes, nil, Set(workloads.map(\.0))), ("gpu shapes", gpuShapes, 32, ["vit sphero", "mixtral"]),
        ]
        for (shapes, tuning, group, names) in passes {
            let backend = try OpenCLBackend(device: shared.device, tuning: tuning)
            OpenCLBackend.workGroupOverride = group
            defer { OpenCLBackend.workGroupOverride = nil }
            for (name, config) in workloads where names.contains(name) {
                let cpu = try Self.run(config, backend: CPUBackend()), cl = try Self.run(config, backend: backend)
                for (i, (a, b)) in zip(cpu, cl).enumerated() {
                    XCTAssertLessThan(abs(a - b) / max(abs(a), 1e-6), 1e-3, "\(shapes) \(name) value \(i): cpu \(a) vs opencl \(b)")
                }
            }
            // Ops no model calls today: Soft MoE's dispatch softmax over tokens (the
            // layer softmaxes its transposed scores by rows instead) and scale.
            let logits = try backend.tensor(randomFloats(15, seed: 7, in: -2...2), shape: [5, 3])
            let weights = try backend.zeros([5, 3]), dLogits = try backend.zeros([5, 3])
            try backend.softmaxOverTokens(logits, into: weights)
            try backend.softmaxOverTokensBackward(weights: weights, dWeights: logits, dLogits: dLogits)
            try backend.scale(dLogits, by: 0.5)
            XCTAssertEqual(try weights.floats().reduce(0, +), 3, accuracy: 1e-5, "\(shapes): each column of the dispatch weights sums to 1")
            // The peak-FLOPs kernel of `moe-gpu bench`, a few iterations.
            let peak = try backend.kernel("fma_peak", in: "peak.cl", defines: "-DPEAK_WIDTH=2 -DPEAK_CHAINS=2")
            let out = try backend.context.makeBuffer(bytes: 16 * 4)
            try peak.launch([.buffer(out), .float(0.99999), .float(1e-6), .int(3)], global: [16], local: [8])
            try backend.synchronize()
            launched.formUnion(backend.context.counters.kernelLaunches.keys)
        }
        let missing = declared.subtracting(launched).sorted()
        XCTAssertEqual(missing, [], "kernels no tiny workload ran: \(missing)")
        XCTAssertEqual(launched.subtracting(declared).sorted(), [], "launched kernels not found in Kernels/*.cl")
    }
}
