import ArgumentParser
import Foundation
import MoECheckpoint

extension UpcycleMethod: ExpressibleByArgument {}
extension RouterInit: ExpressibleByArgument {}
extension RouterKind: ExpressibleByArgument {}
extension OutputFormat: ExpressibleByArgument {}

/// `moe-gpu upcycle`: a dense checkpoint in, an MoE checkpoint out, streamed tensor by tensor.
struct Upcycle: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Turn a dense checkpoint into a Mixture-of-Experts checkpoint (Sparse Upcycling, granular, MoE Jetpack recycling).",
        discussion: """
        Llama-family input (safetensors or GGUF) becomes a Mixtral-layout checkpoint with config.json; \
        other architectures use moe-gpu's own MoE naming. --to names a .safetensors file or a folder \
        (which will hold model.safetensors and, for Mixtral, config.json).
        """)

    @Option(name: .long, help: "Dense checkpoint: .safetensors, index.json, folder, or .gguf.")
    var from: String
    @Option(name: .long, help: "Output .safetensors file or folder.")
    var to: String
    @Option(name: .long, help: "Experts per MoE layer.")
    var experts = 8
    @Option(name: .customLong("top-k"), help: "Experts per token (top-k routers).")
    var topK = 2
    @Option(name: .long, help: "Layers to upcycle: all, every-other (1, 3, 5, ...) or a list like 0,2,5-7.")
    var layers = "all"
    @Option(name: .long, help: "replicate (Sparse Upcycling) | granular (virtual groups) | recycle (MoE Jetpack importance sampling).")
    var method = UpcycleMethod.replicate
    @Option(name: .long, help: "Granular: number of shards the FFN is split into.")
    var granularity = 1
    @Flag(name: .customLong("weight-scaling"), help: "Multiply expert weights by (E*G^2/k)^(1/3) (gated) or its square root (plain), for softmax-topk routing.")
    var weightScaling = false
    @Option(name: .customLong("expert-width"), help: "Recycle: hidden neurons per expert (default half the FFN width).")
    var expertWidth: Int?
    @Option(name: .long, help: "Recycle: residual width of the output, narrower than a moe-gpu ViT input (MoE Jetpack's recycling from a larger model).")
    var width: Int?
    @Option(name: .long, help: "Hidden states feeding the MLPs: .safetensors (hidden_states and/or layers.L, [tokens, hidden]) or .npy [tokens, hidden].")
    var calibration: String?
    @Option(name: .long, help: "Seed for routers, sampling and --verify inputs.")
    var seed: UInt64 = 0
    @Option(name: .customLong("router-init"), help: "random (N(0, 0.02)) | zero | hidden (normalised k-means centroids of calibration states).")
    var routerInit = RouterInit.random
    @Option(name: .long, help: "topk-softmax | softmax-topk | expert-choice | soft | sphero.")
    var router = RouterKind.topkSoftmax
    @Option(name: .customLong("capacity-factor"), help: "Expert choice: each expert takes ceil(C*T/E) tokens.")
    var capacityFactor = 2.0
    @Option(name: .long, help: "auto (Mixtral for Llama input, else own) | mixtral | own.")
    var format = OutputFormat.auto
    @Flag(name: .long, help: "Compare the dense MLP with the written MoE layer on random (and calibration) inputs for every upcycled layer.")
    var verify = false

    func run() throws {
        var o = UpcycleOptions()
        o.experts = experts; o.topK = topK; o.layers = try LayerSelection(parsing: layers)
        o.method = method; o.granularity = granularity; o.weightScaling = weightScaling; o.expertWidth = expertWidth; o.width = width
        o.calibrationPath = calibration; o.seed = seed; o.routerInit = routerInit; o.router = router
        o.capacityFactor = capacityFactor; o.format = format; o.verify = verify
        let start = Date()
        let result = try Upcycler(options: o).run(from: from, to: to) { print($0); fflush(stdout) }
        let s = result.settings
        print("wrote \(result.checkpoint.path) (\(result.tensorCount) tensors)" + (result.config.map { " and \($0.path)" } ?? ""))
        print("MoE layers \(result.layers.map(String.init).joined(separator: ",")): \(s.experts) experts x width \(s.expertWidth), "
              + "\(s.router.rawValue) top-\(s.topK), method \(s.method)" + String(format: " (%.1f s)", Date().timeIntervalSince(start)))
        guard let v = result.verification else { return }
        print(String(format: "verify: max relative difference %.3e over %d layers (%@)", v.maxRelativeDifference, v.layers.count,
                     (v.expectExact ? "must be <= \(VerifyReport.tolerance)" : "reported only: \(v.reason)") as NSString))
        if !v.passed {
            try? FileManager.default.removeItem(at: result.checkpoint)
            if let c = result.config { try? FileManager.default.removeItem(at: c) }
            throw CheckpointError(.verification, String(format: "verify failed: the MoE differs from the dense MLP by %.3e (> %.0e); the output was removed", v.maxRelativeDifference, VerifyReport.tolerance))
        }
        if v.expectExact { print("verify: PASS") }
    }
}
