import Foundation
import MoECompute

/// The router and experts of one MoE layer, loaded as f32.
public struct MoELayerWeights {
    public let router: [Float]
    public let experts: [MLPWeights]

    public static func load(_ source: TensorSource, _ m: MoELayerDescription, hidden: Int, activation: Activation) throws -> MoELayerWeights {
        let router = try source.floats(m.router)
        guard m.routerShape.count == 2, m.routerShape[1] == hidden else {
            throw CheckpointError(.format, "\(m.router) has shape \(m.routerShape), expected [experts, \(hidden)]")
        }
        let experts = try m.expertNames.map { names -> MLPWeights in
            if m.gated {
                let dn = DenseMLPNames(layer: m.layer, fc1: names[1], fc1Bias: nil, fc2: names[2], fc2Bias: nil, gate: names[0], transposed: false)
                return try MLPWeights.load(source, dn, activation: activation)
            }
            let dn = DenseMLPNames(layer: m.layer, fc1: names[0], fc1Bias: names.first { $0.hasSuffix("fc1.bias") },
                                   fc2: names.first { $0.hasSuffix("fc2.weight") }!, fc2Bias: names.first { $0.hasSuffix("fc2.bias") },
                                   gate: nil, transposed: false)
            return try MLPWeights.load(source, dn, activation: activation)
        }
        return MoELayerWeights(router: router, experts: experts)
    }
}

/// `--verify`: the dense MLP against the MoE layer read back from the written file.
public enum Verifier {
    public static func verify(dense: TensorSource, denseDescription d: ModelDescription, moePath: String, layers: [Int],
                              calibration: CalibrationData?, tokens: Int, seed: UInt64,
                              log: (String) -> Void = { _ in }) throws -> VerifyReport {
        let moe = try SafetensorsCheckpoint(path: moePath)
        let md = try ArchitectureAdapter.describe(moe)
        guard let s = RoutingSettings(metadata: moe.metadata) else {
            throw CheckpointError(.format, "\(moePath) has no moe-gpu routing metadata to verify against")
        }
        let exact = (s.method == "replicate" || s.method == "granular") && s.weightScale == 1
            && (s.router == .topkSoftmax || s.router == .expertChoice)
        let reason: String
        if exact { reason = "\(s.method) experts with renormalised combine weights reproduce the dense MLP" }
        else if s.method == "recycle" { reason = "recycled experts hold a sample of the neurons, so the MoE differs from the dense MLP by design" }
        else if s.weightScale != 1 { reason = "weight scaling changes the output scale by design" }
        else if s.router == .softmaxTopk { reason = "softmax-topk does not renormalise, so combine weights sum to less than 1 by design" }
        else { reason = "SpheroMoE mixes tokens into slots, so it is not the dense MLP by design" }

        var checks: [LayerCheck] = []
        for l in layers {
            guard let dn = d.denseMLPs[l], let ml = md.moeLayers[l] else {
                throw CheckpointError(.verification, "layer \(l) is missing from the dense or the MoE checkpoint")
            }
            let denseW = try MLPWeights.load(dense, dn, activation: d.activation)
            let mw = try MoELayerWeights.load(moe, ml, hidden: d.hidden, activation: d.activation)
            var r = rng(seed, 4, UInt64(l))
            var xs: [[Double]] = (0..<tokens).map { _ in (0..<d.hidden).map { _ in Double(r.nextGaussian()) } }
            if let st = calibration?.states(layer: l) {
                let T = min(st.count / d.hidden, 32)
                for t in 0..<T { xs.append((0..<d.hidden).map { Double(st[t * d.hidden + $0]) }) }
            }
            let ref = xs.map { MoEMath.mlp(denseW, $0) }
            let outs: [[Double]], kept: [Bool]
            if s.router == .sphero {
                outs = MoEMath.sphero(phi: mw.router, experts: mw.experts, tokens: xs, tau: s.spheroTau)
                kept = Array(repeating: true, count: xs.count)
            } else {
                (outs, kept) = MoEMath.moe(router: mw.router, experts: mw.experts, tokens: xs, kind: s.router,
                                           topK: s.topK, capacityFactor: s.capacityFactor)
            }
            var worst = 0.0, num = 0.0, den = 0.0
            for t in xs.indices where kept[t] {
                worst = max(worst, MoEMath.relativeDifference(outs[t], ref[t]))
                num += outs[t].reduce(0) { $0 + $1 * $1 }
                den += ref[t].reduce(0) { $0 + $1 * $1 }
            }
            let c = LayerCheck(layer: l, maxRelativeDifference: worst, tokens: xs.count, dropped: kept.filter { !$0 }.count,
                               normRatio: den > 0 ? (num / den).squareRoot() : 0)
            log(String(format: "verify layer %3d: max rel. diff %.3e over %d tokens%@, output norm ratio %.4f",
                       l, worst, c.tokens - c.dropped, c.dropped > 0 ? " (\(c.dropped) dropped by expert choice)" as NSString : "" as NSString,
                       c.normRatio))
            checks.append(c)
        }
        return VerifyReport(layers: checks, expectExact: exact, reason: reason)
    }
}
