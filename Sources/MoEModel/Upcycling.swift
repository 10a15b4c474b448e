import Foundation
import MoECheckpoint
import MoECompute

/// Builds a model's MoE layers from a dense model (in memory, "online" as
/// Llama 3 Meets MoE does at load time).
public enum ExpertInit: String, Codable, Sendable, CaseIterable {
    /// Sparse Upcycling: every expert a copy of the dense MLP (expert width must equal the MLP's).
    case replicate
    /// Virtual-group upcycling: experts are G shards of the dense MLP (G = MLP width / expert
    /// width), each copy's router rows tied so top-k (k a multiple of G) starts as the dense MLP.
    case granular
    /// MoE Jetpack checkpoint recycling: each expert samples its hidden neurons
    /// without replacement, with probability proportional to their importance.
    case recycle
}

/// A model's tensors copied to host memory, seen as a checkpoint (so the
/// checkpoint-side width reduction reads them as it reads a file).
final class HostTensors: TensorSource {
    let tensors: [TensorDescriptor]
    let values: [String: [Float]]
    var sourceDescription: String { "the dense model in memory" }
    var metadata: [String: String] { [:] }
    var directory: URL { URL(fileURLWithPath: ".") }

    init(_ model: Model) throws {
        var t: [TensorDescriptor] = [], v: [String: [Float]] = [:]
        for c in model.checkpointTensors {
            t.append(TensorDescriptor(name: c.name, dtypeName: "F32", shape: c.shape))
            v[c.name] = try c.value().floats()
        }
        tensors = t; values = v
    }
    func descriptor(_ name: String) -> TensorDescriptor? { tensors.first { $0.name == name } }
    func floats(_ name: String) throws -> [Float] {
        guard let v = values[name] else { throw ModelError.badInput("the dense model has no tensor \(name)") }
        return v
    }
    func passthrough(_ name: String) -> (StorageDType, UnsafeRawBufferPointer)? { nil }
    func releasePages(_ name: String) {}
}

public enum OnlineUpcycle {
    /// Copies every tensor the two models share by name from `dense` into `moe`,
    /// then fills each MoE layer's experts from the dense MLP of the same block.
    /// A `dense` model wider than `moe` (same depth, heads, patches) is first
    /// narrowed by `ViTWidthReduction` (MoE Jetpack's recycling from a larger
    /// predecessor). Importance for `recycle` (and the channel choice) is the L2
    /// norm of activations over `calibration` patches ([N, P, patchDim]): hidden
    /// neurons for experts, LayerNorm outputs for channels; without data, weight norms.
    /// `method` nil copies only the shared tensors (MoE layers keep their fresh init).
    /// Returns a line per step taken.
    @discardableResult
    public static func apply(dense: ViT, into moe: ViT, method: ExpertInit?, calibration: Tensor?, seed: UInt64) throws -> [String] {
        let dc = dense.config, mc = moe.config
        guard dc.depth == mc.depth, dc.patchSize == mc.patchSize, dc.pool == mc.pool, dc.heads == mc.heads,
              dc.imageSize == mc.imageSize, dc.channels == mc.channels else {
            throw ModelError.badConfig("the dense and MoE models differ in depth, heads, image or patch size, or pooling")
        }
        guard dc.width >= mc.width else {
            throw ModelError.badConfig("the dense model (width \(dc.width)) is narrower than the MoE model (\(mc.width)): recycling only shrinks")
        }
        if method != nil {
            for l in mc.moeBlocks where !(dense.blocks[l].ffn is DenseMLP) {
                throw ModelError.badConfig("block \(l) of the source model is not dense")
            }
        }
        var neuronImportance: [Int: [Double]] = [:]
        var channelImportance: [Double]?
        if let calibration, method == .recycle || dc.width != mc.width {
            try dense.forward(patches: calibration, training: false, step: 0)
            let rows = calibration.shape[0] * dc.tokens
            func sumSquares(_ t: Tensor, cols: Int, into acc: inout [Double]) throws {
                let a = try t.floats()
                for r in 0..<rows { for h in 0..<cols { acc[h] += Double(a[r * cols + h]) * Double(a[r * cols + h]) } }
            }
            var channels = [Double](repeating: 0, count: dc.width)
            for block in dense.blocks {
                try sumSquares(try block.ws.get("n1", [rows, dc.width]), cols: dc.width, into: &channels)
                try sumSquares(try block.ws.get("n2", [rows, dc.width]), cols: dc.width, into: &channels)
                guard let mlp = block.ffn as? DenseMLP else { continue }
                let hidden = mlp.fc1.outFeatures
                var sq = [Double](repeating: 0, count: hidden)
                try sumSquares(try mlp.ws.get("a", [rows, hidden]), cols: hidden, into: &sq)
                neuronImportance[block.index] = sq.map { $0.squareRoot() }
            }
            try sumSquares(try dense.ws.get("normed", [rows, dc.width]), cols: dc.width, into: &channels)
            channelImportance = channels.map { $0.squareRoot() }
        }

        var log: [String] = []
        var weights: TensorSource = try HostTensors(dense)
        if dc.width != mc.width {
            let plan = try ViTWidthReduction.plan(source: weights, width: mc.width, heads: mc.heads, keepWholeMLPs: Set(mc.moeBlocks),
                                                  channelImportance: channelImportance, neuronImportance: neuronImportance, seed: seed)
            weights = try NarrowedSource(weights, plan)
            log.append("width \(dc.width) -> \(mc.width): \(mc.width) channels and \(mc.width / mc.heads) of \(dc.width / dc.heads) dimensions per head sampled by "
                       + (channelImportance == nil ? "LayerNorm weight norms" : "LayerNorm output norms")
                       + (mc.moeBlocks.count < mc.depth ? ", dense MLPs \(dc.hidden) -> \(mc.hidden) neurons" : ""))
        }
        // Everything outside the MoE layers must come from the dense model.
        for t in moe.checkpointTensors {
            if let d = weights.descriptor(t.name), d.shape == t.shape {
                try t.value().write(try weights.floats(t.name))
            } else if !mc.moeBlocks.contains(where: { t.name.hasPrefix("blocks.\($0).moe.") }) {
                throw ModelError.badConfig("the dense model has no tensor \(t.name) \(t.shape) to copy (its \(weights.descriptor(t.name)?.shape.description ?? "is missing"))")
            }
        }
        guard let method else { return log }
        var rng = SplitMix64(seed: seed)
        for mBlock in moe.blocks where mc.moeBlocks.contains(mBlock.index) {
            let l = mBlock.index, p = "blocks.\(l).mlp."
            let w1 = try weights.floats(p + "fc1.weight"), b1 = try weights.floats(p + "fc1.bias")
            let w2 = try weights.floats(p + "fc2.weight"), b2 = try weights.floats(p + "fc2.bias")
            let width = mc.width, hidden = b1.count
            let importance = neuronImportance[l] ?? (0..<hidden).map { h in
                var n1 = 0.0, n2 = 0.0
                for j in 0..<width { n1 += Double(w1[h * width + j] * w1[h * width + j]); n2 += Double(w2[j * hidden + h] * w2[j * hidden + h]) }
                return (n1 * n2).squareRoot()
            }
            let banks: [ExpertBank]
            var granularRouter: Linear?
            if let layer = mBlock.ffn as? MoELayer { banks = [layer.experts]; granularRouter = layer.router }
            else if let layer = mBlock.ffn as? SoftMoELayer { banks = [layer.core, layer.universal].compactMap { $0 } }
            else { continue }
            var widths: [Int] = []
            for bank in banks {
                var bw1: [Float] = [], bb1: [Float] = [], bw2: [Float] = [], bb2: [Float] = []
                // Every expert in order (recycling draws for each), kept if held here (expert parallelism).
                for e in 0..<bank.totalExperts {
                    let neurons: [Int]
                    var outScale: Float = 1
                    switch method {
                    case .replicate:
                        guard bank.hidden == hidden else {
                            throw ModelError.badConfig("replicate needs experts as wide as the dense MLP (\(hidden)), got \(bank.hidden): use recycle or granular")
                        }
                        neurons = Array(0..<hidden)
                    case .granular:
                        let g = hidden / bank.hidden
                        guard granularRouter != nil, g * bank.hidden == hidden, bank.totalExperts % g == 0 else {
                            throw ModelError.badConfig("granular needs a top-k or expert-choice layer whose expert width (\(bank.hidden)) divides the MLP width (\(hidden)) and whose experts (\(bank.totalExperts)) are whole copies of the \(hidden / max(bank.hidden, 1)) shards")
                        }
                        // Expert e = copy e/G, shard e%G; its output times G (b2 whole) so a
                        // whole copy picked with weights 1/G gives back the dense MLP.
                        neurons = Array((e % g) * bank.hidden..<(e % g + 1) * bank.hidden)
                        outScale = Float(g)
                    case .recycle:
                        guard bank.hidden <= hidden else {
                            throw ModelError.badConfig("recycled experts (\(bank.hidden)) cannot be wider than the dense MLP (\(hidden))")
                        }
                        neurons = ImportanceSampling.sample(weights: importance, count: bank.hidden, rng: &rng).sorted()
                    }
                    guard bank.held.contains(e) else { continue }
                    var e2 = [Float](repeating: 0, count: width * bank.hidden)
                    for (i, h) in neurons.enumerated() {
                        bw1 += w1[(h * width)..<((h + 1) * width)]
                        bb1.append(b1[h])
                        for j in 0..<width { e2[j * bank.hidden + i] = w2[j * hidden + h] * outScale }
                    }
                    bw2 += e2
                    bb2 += b2
                }
                try bank.w1.value.write(bw1); try bank.b1?.value.write(bb1)
                try bank.w2.value.write(bw2); try bank.b2?.value.write(bb2)
                widths.append(bank.hidden)
            }
            if method == .granular, let router = granularRouter {
                // Tie the router rows of each copy's shards, so top-k picks whole copies.
                let g = hidden / banks[0].hidden, rows = try router.weight.value.floats()
                var tied = rows
                for e in 0..<banks[0].totalExperts { for j in 0..<width { tied[e * width + j] = rows[(e / g * g) * width + j] } }
                try router.weight.value.write(tied)
            }
            log.append("block \(l): \(banks.map(\.totalExperts).reduce(0, +)) experts of width \(widths.map(String.init).joined(separator: "/")) from the dense MLP (\(hidden)) by \(method.rawValue)")
        }
        return log
    }
}
