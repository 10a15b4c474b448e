import Foundation
import MoECompute

/// The one definition of every router name. The raw values are what
/// `moe-gpu.router` holds in a checkpoint's `__metadata__`, what `moe-gpu
/// inspect` prints and what `upcycle --router` takes; training (`MoEConfig`),
/// upcycling, `--verify` (`MoEMath`) and inspect all read the semantics from
/// the properties below, so a name means one function everywhere.
///
/// A name describes the function the layer computes, not how a kernel gets
/// there: top-k of the softmax renormalised over the k equals the softmax over
/// the top-k logits, so training with `gateOrder: "softmax-topk", renormalize:
/// true` is `topk-softmax`. Old metadata: checkpoints written by `moe-gpu
/// train` before this definition labelled that case `softmax-topk`; they carry
/// their training config (`moe-gpu.config` / `moe-gpu.lm_config`), and
/// `RoutingSettings(metadata:)` derives the name from it, so they read back as
/// `topk-softmax`. Upcycled `expert-choice` files written before it were
/// verified with per-token renormalised weights; the same tensors now route with
/// the raw gate values (the weights in the file are unchanged).
public enum RouterKind: String, CaseIterable, Sendable {
    /// Token choice: top-k on the logits, softmax over the k (= softmax, top-k,
    /// renormalise; Mixtral, Llama 3 Meets MoE). A token's combine weights sum to 1.
    case topkSoftmax = "topk-softmax"
    /// Token choice: softmax over all experts, then top-k, no renormalisation
    /// (He et al. 2024; Qwen2-MoE `norm_topk_prob: false`). Weights sum to less than 1.
    case softmaxTopk = "softmax-topk"
    /// Expert choice (Zhou et al. 2022): softmax over experts per token, each
    /// expert takes its `ceil(C*T/E)` tokens with the highest probability; the
    /// combine weight is that token-expert probability, not renormalised, so a
    /// token no expert took gets 0 (and one taken by several gets their sum).
    case expertChoice = "expert-choice"
    /// Soft MoE (Puigcerver et al. 2023): dot-product logits of tokens and slot
    /// queries, dispatch = softmax over tokens, combine = softmax over slots.
    case soft
    /// SpheroMoE (MoE Jetpack): as Soft MoE with cosine logits (tokens and
    /// queries L2-normalised, no LayerNorm inside the layer) divided by learnable
    /// dispatch and combine temperatures.
    case sphero

    /// Each token picks its top-k experts (`topk-softmax`, `softmax-topk`).
    public var isTokenChoice: Bool { self == .topkSoftmax || self == .softmaxTopk }
    /// Each expert picks its tokens.
    public var isExpertChoice: Bool { self == .expertChoice }
    /// Slots mix all tokens and tokens mix all slots (Soft MoE, SpheroMoE): nothing is dropped.
    public var isSoft: Bool { self == .soft || self == .sphero }
    /// Cosine routing with dispatch/combine temperatures (SpheroMoE).
    public var isSphero: Bool { self == .sphero }
    /// The order of a token-choice gate as the training config spells it
    /// (`MoEConfig.gateOrder`): softmax before top-k, or top-k before softmax. nil for other routers.
    public var gateOrder: String? {
        switch self {
        case .topkSoftmax: return "topk-softmax"
        case .softmaxTopk: return "softmax-topk"
        default: return nil
        }
    }
    /// A token's combine weights over the experts it was sent to sum to 1.
    /// Only `topk-softmax`; expert choice uses the raw probabilities, and the
    /// soft routers' weights are a softmax over slots, not over experts picked.
    public var renormalizes: Bool { self == .topkSoftmax }
    /// Routes with `top_k` experts per token (the metadata's `top_k` means something).
    public var usesTopK: Bool { isTokenChoice }
    /// Routes with a capacity factor (0 in the metadata: dropless).
    public var usesCapacityFactor: Bool { isTokenChoice || isExpertChoice }
    /// `MoEConfig.router` of the training config that trains this router.
    public var trainingRouter: String {
        switch self {
        case .topkSoftmax, .softmaxTopk: return "topk"
        case .expertChoice: return "expert-choice"
        case .soft: return "soft"
        case .sphero: return "sphero"
        }
    }

    /// Expert choice's capacity factor when a training config leaves it out.
    public static let defaultExpertChoiceCapacityFactor = 2.0

    /// The router a training config (`MoEConfig`'s `router`, `gateOrder`,
    /// `renormalize`) trains; nil for an unknown router or gate order.
    /// `topk-softmax` ignores `renormalize` (its weights always sum to 1).
    public init?(trainingRouter router: String, gateOrder: String, renormalize: Bool) {
        switch router {
        case "topk":
            switch gateOrder {
            case "topk-softmax": self = .topkSoftmax
            case "softmax-topk": self = renormalize ? .topkSoftmax : .softmaxTopk
            default: return nil
            }
        case "expert-choice": self = .expertChoice
        case "soft": self = .soft
        case "sphero": self = .sphero
        default: return nil
        }
    }

    /// The names `--router` and `moe-gpu.router` accept, for messages.
    public static var nameList: String { allCases.map(\.rawValue).joined(separator: ", ") }
}

/// Float64 reference forward passes of a dense MLP and of an MoE layer, used
/// by `--verify` and the tests. Slow and obvious on purpose.
public enum MoEMath {
    /// y = MLP(x) for one token, x of length H.
    public static func mlp(_ w: MLPWeights, _ x: [Double]) -> [Double] {
        let H = w.hidden, I = w.width
        var h = [Double](repeating: 0, count: I)
        for i in 0..<I {
            var a = Double(w.b1?[i] ?? 0)
            for j in 0..<H { a += Double(w.w1[i * H + j]) * x[j] }
            if let wg = w.wg {
                var g = 0.0
                for j in 0..<H { g += Double(wg[i * H + j]) * x[j] }
                h[i] = w.activation.apply(g) * a
            } else {
                h[i] = w.activation.apply(a)
            }
        }
        var y = [Double](repeating: 0, count: H)
        for o in 0..<H {
            var s = Double(w.b2?[o] ?? 0)
            for i in 0..<I { s += Double(w.w2[o * I + i]) * h[i] }
            y[o] = s
        }
        return y
    }

    /// The post-activation hidden units of one token (for importance statistics).
    public static func hiddenUnits(_ w: MLPWeights, _ x: ArraySlice<Float>) -> [Double] {
        let H = w.hidden
        let base = x.startIndex
        return (0..<w.width).map { i in
            var a = Double(w.b1?[i] ?? 0)
            for j in 0..<H { a += Double(w.w1[i * H + j]) * Double(x[base + j]) }
            guard let wg = w.wg else { return w.activation.apply(a) }
            var g = 0.0
            for j in 0..<H { g += Double(wg[i * H + j]) * Double(x[base + j]) }
            return w.activation.apply(g) * a
        }
    }

    static func softmax(_ v: [Double]) -> [Double] {
        let m = v.max() ?? 0
        let e = v.map { exp($0 - m) }
        let s = e.reduce(0, +)
        return e.map { $0 / s }
    }

    /// Indices of the k largest values; ties go to the lower index (stable).
    public static func topK(_ v: [Double], _ k: Int) -> [Int] {
        Array(v.indices.sorted { v[$0] != v[$1] ? v[$0] > v[$1] : $0 < $1 }.prefix(k))
    }

    /// Per token, the (expert, combine weight) pairs; `logits` is `[T][E]`.
    /// Expert choice may leave a token with no expert (dropped): an empty list.
    public static func route(_ logits: [[Double]], kind: RouterKind, topK k: Int, capacityFactor: Double) -> [[(Int, Double)]] {
        switch kind {
        case .topkSoftmax:
            return logits.map { l in
                let idx = topK(l, k)
                let p = softmax(idx.map { l[$0] })
                return Array(zip(idx, p))
            }
        case .softmaxTopk:
            return logits.map { l in
                let p = softmax(l)
                return topK(p, k).map { ($0, p[$0]) }
            }
        case .expertChoice:
            let T = logits.count, E = logits.first?.count ?? 0
            let probs = logits.map(softmax)
            let capacity = ExpertChoice.capacity(tokens: T, experts: E, factor: capacityFactor)
            var picked = [[(Int, Double)]](repeating: [], count: T)
            for e in 0..<E {
                for t in topK(probs.map { $0[e] }, capacity) { picked[t].append((e, probs[t][e])) }
            }
            // The gate value itself (Zhou et al. 2022), not renormalised per token.
            return picked
        case .soft, .sphero:
            preconditionFailure("\(kind.rawValue) routing mixes tokens into slots; use MoEMath.softMoE")
        }
    }

    static func dot(_ w: [Float], row: Int, _ x: [Double]) -> Double {
        let H = x.count
        var s = 0.0
        for j in 0..<H { s += Double(w[row * H + j]) * x[j] }
        return s
    }

    /// Top-k style MoE layer: router `[E, H]`, experts, tokens `[T][H]`.
    /// Returns outputs and whether each token was routed anywhere.
    public static func moe(router: [Float], experts: [MLPWeights], tokens: [[Double]], kind: RouterKind,
                           topK k: Int, capacityFactor: Double) -> (outputs: [[Double]], kept: [Bool]) {
        let E = experts.count
        let logits = tokens.map { x in (0..<E).map { dot(router, row: $0, x) } }
        let routes = route(logits, kind: kind, topK: k, capacityFactor: capacityFactor)
        var outs: [[Double]] = []
        for (t, x) in tokens.enumerated() {
            var y = [Double](repeating: 0, count: x.count)
            for (e, w) in routes[t] {
                let ye = mlp(experts[e], x)
                for i in 0..<y.count { y[i] += w * ye[i] }
            }
            outs.append(y)
        }
        return (outs, routes.map { !$0.isEmpty })
    }

    /// `x / max(||x||, epsilon)`, as the backends' `l2NormalizeRows`.
    static func l2normalize(_ x: [Double], epsilon: Double = 1e-6) -> [Double] {
        let n = max(x.reduce(0) { $0 + $1 * $1 }.squareRoot(), epsilon)
        return x.map { $0 / n }
    }

    /// Soft MoE and SpheroMoE forward for the tokens of one image (no noise:
    /// inference), exactly as the trained layer (`SoftMoELayer`) computes it.
    /// `phi` is `[S, H]`, one query per slot; slot s belongs to expert
    /// `s / slotsPerExpert` (`experts` in slot order: core, then universal).
    /// Soft MoE: `L = X phi^T`. SpheroMoE: `L = l2norm(X) l2norm(phi)^T` (no
    /// LayerNorm: the block's norm2 precedes the layer), `L_d = L / tau_d`,
    /// `L_c = L / tau_c`. Dispatch `D = softmax over tokens (L_d)`, slot inputs
    /// `S = D^T X` (the raw tokens), combine `C = softmax over slots (L_c)`, output `C Y`.
    public static func softMoE(phi: [Float], experts: [MLPWeights], slotsPerExpert: Int, tokens: [[Double]],
                               spherical: Bool, tauDispatch: Double, tauCombine: Double) -> [[Double]] {
        let T = tokens.count, H = tokens.first?.count ?? 0, S = experts.count * slotsPerExpert
        precondition(phi.count == S * H, "phi has \(phi.count) values, expected \(S) slots x \(H)")
        let keys = spherical ? tokens.map { l2normalize($0) } : tokens
        let queries = (0..<S).map { s -> [Double] in
            let q = (0..<H).map { Double(phi[s * H + $0]) }
            return spherical ? l2normalize(q) : q
        }
        let scores = keys.map { k in queries.map { q in zip(k, q).reduce(0) { $0 + $1.0 * $1.1 } } }
        let ld = spherical ? scores.map { $0.map { $0 / tauDispatch } } : scores
        let lc = spherical ? scores.map { $0.map { $0 / tauCombine } } : scores
        var slotOut: [[Double]] = []
        for s in 0..<S {
            let d = softmax((0..<T).map { ld[$0][s] })
            var x = [Double](repeating: 0, count: H)
            for t in 0..<T { for j in 0..<H { x[j] += d[t] * tokens[t][j] } }
            slotOut.append(mlp(experts[s / slotsPerExpert], x))
        }
        return (0..<T).map { t in
            let c = softmax(lc[t])
            var y = [Double](repeating: 0, count: H)
            for s in 0..<S { for j in 0..<H { y[j] += c[s] * slotOut[s][j] } }
            return y
        }
    }

    /// SpheroMoE with one slot per expert and one temperature (an upcycled layer at initialisation).
    public static func sphero(phi: [Float], experts: [MLPWeights], tokens: [[Double]], tau: Double) -> [[Double]] {
        softMoE(phi: phi, experts: experts, slotsPerExpert: 1, tokens: tokens, spherical: true, tauDispatch: tau, tauCombine: tau)
    }

    /// `||a - b|| / ||b||` (absolute when b is zero).
    public static func relativeDifference(_ a: [Double], _ b: [Double]) -> Double {
        Reference.relativeError(a, b)
    }
}
