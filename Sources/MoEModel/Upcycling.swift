import Foundation
import MoECheckpoint
import MoECompute

/// Builds a model's MoE layers from a dense model of the same shape
/// (in memory, "online" as Llama 3 Meets MoE does at load time).
public enum ExpertInit: String, Codable, Sendable, CaseIterable {
    /// Sparse Upcycling: every expert a copy of the dense MLP (expert width must equal the MLP's).
    case replicate
    /// MoE Jetpack checkpoint recycling: each expert samples its hidden neurons
    /// without replacement, with probability proportional to their importance.
    case recycle
}

public enum OnlineUpcycle {
    /// Copies every tensor the two models share by name from `dense` into `moe`,
    /// then fills each MoE layer's experts from the dense MLP of the same block.
    /// Importance for `recycle` is the L2 norm of each hidden neuron's activation
    /// over `calibration` patches ([N, P, patchDim]); without it, weight norms.
    /// Returns a line per upcycled block.
    @discardableResult
    /// `method` nil copies only the shared tensors (MoE layers keep their fresh init).
    public static func apply(dense: ViT, into moe: ViT, method: ExpertInit?, calibration: Tensor?, seed: UInt64) throws -> [String] {
        guard dense.config.width == moe.config.width, dense.config.depth == moe.config.depth,
              dense.config.patchSize == moe.config.patchSize, dense.config.pool == moe.config.pool else {
            throw ModelError.badConfig("the dense and MoE models differ in width, depth, patch size or pooling")
        }
        for p in moe.params.all {
            if let src = dense.params[p.name], src.shape == p.shape { try moe.backend.copy(src.value, to: p.value) }
        }
        guard let method else { return [] }
        var importance: [Int: [Double]] = [:]
        if let calibration {
            try dense.forward(patches: calibration, training: false, step: 0)
            for block in dense.blocks where moe.config.moeBlocks.contains(block.index) {
                guard let mlp = block.ffn as? DenseMLP else { continue }
                let rows = calibration.shape[0] * dense.config.tokens, hidden = mlp.fc1.outFeatures
                let a = try mlp.ws.get("a", [rows, hidden]).floats()
                var sq = [Double](repeating: 0, count: hidden)
                for r in 0..<rows { for h in 0..<hidden { sq[h] += Double(a[r * hidden + h]) * Double(a[r * hidden + h]) } }
                importance[block.index] = sq.map { $0.squareRoot() }
            }
        }
        var log: [String] = []
        var rng = SplitMix64(seed: seed)
        for (dBlock, mBlock) in zip(dense.blocks, moe.blocks) where moe.config.moeBlocks.contains(mBlock.index) {
            guard let mlp = dBlock.ffn as? DenseMLP else {
                throw ModelError.badConfig("block \(dBlock.index) of the source model is not dense")
            }
            let w1 = try mlp.fc1.weight.value.floats(), b1 = try mlp.fc1.bias!.value.floats()
            let w2 = try mlp.fc2.weight.value.floats(), b2 = try mlp.fc2.bias!.value.floats()
            let hidden = mlp.fc1.outFeatures, width = mlp.fc1.inFeatures
            let weights = importance[dBlock.index] ?? (0..<hidden).map { h in
                var n1 = 0.0, n2 = 0.0
                for j in 0..<width { n1 += Double(w1[h * width + j] * w1[h * width + j]); n2 += Double(w2[j * hidden + h] * w2[j * hidden + h]) }
                return (n1 * n2).squareRoot()
            }
            let banks: [ExpertBank]
            if let layer = mBlock.ffn as? MoELayer { banks = [layer.experts] }
            else if let layer = mBlock.ffn as? SoftMoELayer { banks = [layer.core, layer.universal].compactMap { $0 } }
            else { continue }
            var widths: [Int] = []
            for bank in banks {
                var bw1: [Float] = [], bb1: [Float] = [], bw2: [Float] = [], bb2: [Float] = []
                for _ in 0..<bank.experts {
                    let neurons: [Int]
                    switch method {
                    case .replicate:
                        guard bank.hidden == hidden else {
                            throw ModelError.badConfig("replicate needs experts as wide as the dense MLP (\(hidden)), got \(bank.hidden): use recycle")
                        }
                        neurons = Array(0..<hidden)
                    case .recycle:
                        guard bank.hidden <= hidden else {
                            throw ModelError.badConfig("recycled experts (\(bank.hidden)) cannot be wider than the dense MLP (\(hidden))")
                        }
                        neurons = ImportanceSampling.sample(weights: weights, count: bank.hidden, rng: &rng).sorted()
                    }
                    var e2 = [Float](repeating: 0, count: width * bank.hidden)
                    for (i, h) in neurons.enumerated() {
                        bw1 += w1[(h * width)..<((h + 1) * width)]
                        bb1.append(b1[h])
                        for j in 0..<width { e2[j * bank.hidden + i] = w2[j * hidden + h] }
                    }
                    bw2 += e2
                    bb2 += b2
                }
                try bank.w1.value.write(bw1); try bank.b1?.value.write(bb1)
                try bank.w2.value.write(bw2); try bank.b2?.value.write(bb2)
                widths.append(bank.hidden)
            }
            log.append("block \(mBlock.index): \(banks.map(\.experts).reduce(0, +)) experts of width \(widths.map(String.init).joined(separator: "/")) from the dense MLP (\(hidden)) by \(method.rawValue)")
        }
        return log
    }
}
