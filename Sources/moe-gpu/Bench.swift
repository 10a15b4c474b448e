import ArgumentParser
import Foundation
import MoECompute
import MoEModel

/// Kernel microbenchmarks: median of timed runs after warm-up, GFLOP/s or
/// GB/s, and the share of the device's own measured ceilings.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Kernel microbenchmarks (GEMM, grouped GEMM, routing, permute, combine, nn, optimiser, whole MoE layer, training step).",
        discussion: """
            Reports the median of --runs timed runs after warm-up with the spread (min..max), GFLOP/s or GB/s, and the \
            percentage of the ceilings this bench measures on the device itself: a large copy for bandwidth, its best GEMM \
            for compute (% ceil), and for compute rows also the fp32 FMA peak (% peak): FMA chains in registers on every \
            core at the widest vector width the CPU has (AVX-512, else AVX2+FMA, else 4-wide), or a compute-bound kernel \
            (Kernels/peak.cl) over a whole OpenCL device. A peak below the best GEMM of the same run is a wrong probe or a \
            busy machine: the bench warns on stderr and in the JSON (peak_warning). GB/s counts the bytes each op must read \
            and write at minimum. Rows with companions time them in the \
            same loop, alternating: gemm rows on the CPU backend against a plain cblas_sgemm loop (vs_openblas = time ratio), \
            grouped GEMMs against one GEMM of the same FLOPs (vs_single_gemm), the MoE layer against its expert bank alone \
            and its routing/permute/combine ops alone (outside_experts_share, routing_ops_share). train-step rows count \
            6 x active parameters x tokens as FLOPs, so their % peak is the MFU (also as mfu, a fraction).
            """)

    @Option(name: .long, help: "Device(s) to bench: auto, cpu, opencl, opencl:P:D or all.")
    var device = "all"
    @Option(name: .long, help: "Only kernels whose name contains this text.")
    var kernel: String?
    @Option(name: .long, help: "Only shapes whose label contains this text.")
    var shape: String?
    @Option(name: .long, help: "Timed runs per case (at least 10 recommended; --quick defaults to 3).")
    var runs: Int?
    @Flag(name: .long, help: "Small shapes and 3 runs: every case in seconds (for tests).")
    var quick = false
    @Flag(name: .long, help: "One JSON object per line instead of a table.")
    var json = false
    @Option(name: .long, help: "A Llama checkpoint (GGUF or Hugging Face folder): adds lm-train-step rows for it dense and upcycled to 8 experts top-2 (sequence 256 x batch 4, as the issue's PyTorch figures).")
    var lmCheckpoint: String?

    /// The model-level cases: the whole MoE layer, and the training step of the
    /// default model (SpheroMoE), its dense variant and the same model with every
    /// other router (top-2 dropless, expert choice, Soft MoE), each reporting its
    /// launches and host syncs per step.
    static func modelCases(_ s: BenchShapes) -> [BenchCase] {
        let sphero = Recipe.defaultFineTune()
        var configs = [sphero]
        var dense = sphero
        dense.model.moeBlocks = []
        dense.model.moe = nil
        configs.append(dense)
        for router in ["topk", "expert-choice", "soft"] {
            var c = sphero
            c.model.moe = Recipe.moe(router: router)
            configs.append(c)
        }
        if s.quick { for i in configs.indices { configs[i].batchSize = 8 } }
        let describe = { (c: TrainConfig) in
            "ViT w=\(c.model.width) d=\(c.model.depth) \(c.model.moe.map { "\($0.router) E=\($0.experts) in \(c.model.moeBlocks)" } ?? "dense") B=\(c.batchSize)"
        }
        // Quick runs train on synthetic images: loading Fashion-MNIST takes longer than the steps.
        return [LayerBenchmark.moeLayer(tokens: s.t, width: s.h, hidden: s.i, experts: s.e, k: s.k)]
            + configs.map { LayerBenchmark.trainStep(config: $0, label: describe($0), synthetic: s.quick) }
            + languageModelCases(s)
    }

    /// The default byte-level Llama of `train --task lm`, dense and 8 experts top-2 in every layer.
    static func languageModelCases(_ s: BenchShapes) -> [BenchCase] {
        var moe = LMRecipe.defaultFineTune()
        if s.quick { moe.batchSize = 2; moe.seqLen = 32 }
        var dense = moe
        dense.lm?.moe = nil; dense.lm?.moeLayers = []
        let describe = { (c: TrainConfig) in
            "Llama h=\(c.lm!.hidden) L=\(c.lm!.layers) \(c.lm!.moe.map { "\($0.experts)x top-\($0.topK)" } ?? "dense") \(c.batchSize)x\(c.seqLen)"
        }
        return [dense, moe].map { LayerBenchmark.lmTrainStep(config: $0, label: describe($0)) }
    }

    /// A real checkpoint at the issue's shapes (batch 4 x sequence 256), dense and 8 x top-2 replicate.
    static func checkpointCases(_ path: String) -> [BenchCase] {
        var c = LMRecipe.defaultFineTune()
        c.batchSize = 4; c.seqLen = 256
        var dense = c
        dense.lm?.moe = nil
        let name = (path as NSString).lastPathComponent
        return [LayerBenchmark.lmTrainStep(config: dense, checkpoint: path, label: "\(name) dense 4x256"),
                LayerBenchmark.lmTrainStep(config: c, checkpoint: path, label: "\(name) 8x top-2 replicate 4x256")]
    }

    func run() throws {
        let catalog = DeviceCatalog()
        let selectors: [DeviceSelector] = device == "all"
            ? [.cpu] + catalog.openCLDevices.map { .openCLDevice(platform: $0.platform.index, device: $0.index) }
            : [try DeviceSelector.resolve(device)]
        let shapes: BenchShapes = quick ? .quick : .full
        let timedRuns = max(runs ?? (quick ? 3 : 10), 1)
        let all = BenchSuite.cases(shapes) + Bench.modelCases(shapes) + (lmCheckpoint.map(Bench.checkpointCases) ?? [])
        let cases = all.filter { c in
            (kernel.map { c.kernel.contains($0) } ?? true) && (shape.map { c.shape.contains($0) } ?? true)
        }
        for selector in selectors {
            let backend = try catalog.makeBackend(selector)
            let suite = try BenchSuite(backend: backend, runs: timedRuns, shapes: shapes)
            let peak = suite.fmaPeak
            if let warning = suite.peakWarning {
                FileHandle.standardError.write(Data("warning: \(backend.name): \(warning)\n".utf8))
            }
            if !json {
                print("\(backend.name): \(backend.deviceDescription)")
                print(String(format: "  ceilings measured here: %.1f GB/s copy (%d MiB), %.1f GFLOP/s best GEMM (%d^3), "
                             + "%.1f GFLOP/s FMA peak (%@, %d %@, best of %d x %.0f ms; GEMM at %.0f%% of it); %d timed runs per case%@",
                             suite.bandwidthCeiling, (shapes.copyElements * 4) >> 20, suite.computeCeiling, suite.ceilingGemmSize,
                             peak.gflops, peak.isa, peak.parallelism, backend is CPUBackend ? "threads" : "work-items",
                             peak.repeats, peak.seconds * 1e3, 100 * suite.computeCeiling / peak.gflops,
                             timedRuns, quick ? " (quick shapes)" : ""))
                print(BenchResult.tableHeader)
            }
            for c in cases {
                guard let r = try suite.measure(c) else { continue }
                if json {
                    let object = r.json(device: backend.name, description: backend.deviceDescription, ceiling: suite.ceilingJSON)
                    let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else {
                    print(r.tableRow)
                }
                fflush(stdout)
            }
        }
    }
}
