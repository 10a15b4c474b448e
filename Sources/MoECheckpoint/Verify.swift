import Foundation
import MoECompute

/// The router and experts of one MoE layer, loaded as f32.
public struct MoELayerWeights {
    /// `[E, H]`, or for Soft MoE / SpheroMoE `[slots, H]` (one query per slot).
    public let router: [Float]
    /// In slot order for Soft MoE / SpheroMoE (core experts, then universal).
    public let experts: [MLPWeights]
    public var slotsPerExpert = 1
    /// SpheroMoE's learnt temperatures, when the file has them (trained layers);
    /// an upcycled layer has none and uses `moe-gpu.sphero_tau`.
    public var tauDispatch: Double? = nil
    public var tauCombine: Double? = nil

    public init(router: [Float], experts: [MLPWeights]) { self.router = router; self.experts = experts }

    public static func load(_ source: TensorSource, _ m: MoELayerDescription, hidden: Int, activation: Activation) throws -> MoELayerWeights {
        let router = try source.floats(m.router)
        guard m.routerShape.count == 2, m.routerShape[1] == hidden, m.routerShape[0] == m.experts * m.slotsPerExpert else {
            throw CheckpointError(.format, "\(m.router) has shape \(m.routerShape), expected [\(m.experts) experts (x slots per expert), \(hidden)]")
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
        var w = MoELayerWeights(router: router, experts: experts)
        w.slotsPerExpert = m.slotsPerExpert
        func scalar(_ name: String?) throws -> Double? {
            guard let name else { return nil }
            let v = try source.floats(name)
            guard v.count == 1 else { throw CheckpointError(.format, "\(name) has \(v.count) values, expected 1") }
            return Double(v[0])
        }
        w.tauDispatch = try scalar(m.temperatureDispatch)
        w.tauCombine = try scalar(m.temperatureCombine)
        return w
    }

    /// The layer's float64 forward (inference: no jitter, noise or dropout) as
    /// `settings` define the routing. `tokens` are the rows the layer routes
    /// together: the whole batch for top-k and expert choice (expert choice picks
    /// among all of them), one image for Soft MoE / SpheroMoE. `kept` is false for
    /// tokens no expert took (expert choice).
    public func forward(_ tokens: [[Double]], settings s: RoutingSettings) -> (outputs: [[Double]], kept: [Bool]) {
        if s.router.isSoft {
            let outs = MoEMath.softMoE(phi: router, experts: experts, slotsPerExpert: slotsPerExpert, tokens: tokens,
                                       spherical: s.router.isSphero, tauDispatch: tauDispatch ?? s.spheroTau,
                                       tauCombine: tauCombine ?? s.spheroTau)
            return (outs, Array(repeating: true, count: tokens.count))
        }
        return MoEMath.moe(router: router, experts: experts, tokens: tokens, kind: s.router, topK: s.topK, capacityFactor: s.capacityFactor)
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
        let exact = (s.method == "replicate" || s.method == "granular") && s.weightScale == 1 && s.router.renormalizes
        let reason: String
        if exact { reason = "\(s.method) experts with renormalised combine weights reproduce the dense MLP" }
        else if s.method == "recycle" { reason = "recycled experts hold a sample of the neurons, so the MoE differs from the dense MLP by design" }
        else if s.weightScale != 1 { reason = "weight scaling changes the output scale by design" }
        else if s.router == .softmaxTopk { reason = "softmax-topk does not renormalise, so combine weights sum to less than 1 by design" }
        else if s.router == .expertChoice {
            reason = "expert-choice combines with the raw router probabilities (Zhou et al. 2022), which do not sum to 1 per token, so it is not the dense MLP by design"
        }
        else { reason = "\(s.router == .sphero ? "SpheroMoE" : "Soft MoE") mixes tokens into slots, so it is not the dense MLP by design" }

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
            let (outs, kept) = mw.forward(xs, settings: s)
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
