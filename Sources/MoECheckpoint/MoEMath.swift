import Foundation
import MoECompute

/// How an MoE layer turns router logits into per-token expert weights.
public enum RouterKind: String, CaseIterable, Sendable {
    /// Top-k on the logits, softmax over the k (= Mixtral's softmax, top-k, renormalise).
    case topkSoftmax = "topk-softmax"
    /// Softmax over all experts, then top-k, no renormalisation (He et al. 2024).
    case softmaxTopk = "softmax-topk"
    /// Each expert takes its `ceil(C*T/E)` best tokens; a token's weights are renormalised over the experts that took it.
    case expertChoice = "expert-choice"
    /// SpheroMoE (MoE Jetpack): cosine logits, soft dispatch over tokens and combine over slots.
    case sphero
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
            let capacity = min(T, Int((capacityFactor * Double(T) / Double(max(E, 1))).rounded(.up)))
            var picked = [[(Int, Double)]](repeating: [], count: T)
            for e in 0..<E {
                for t in topK(probs.map { $0[e] }, capacity) { picked[t].append((e, probs[t][e])) }
            }
            return picked.map { p in
                let s = p.reduce(0) { $0 + $1.1 }
                return p.map { ($0.0, $0.1 / s) }
            }
        case .sphero:
            preconditionFailure("sphero routing mixes tokens; use MoEMath.sphero")
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

    static func layerNorm(_ x: [Double]) -> [Double] {
        let n = Double(x.count)
        let mean = x.reduce(0, +) / n
        let v = x.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / n
        let inv = 1 / (v + 1e-6).squareRoot()
        return x.map { ($0 - mean) * inv }
    }

    static func l2normalize(_ x: [Double]) -> [Double] {
        let n = max(x.reduce(0) { $0 + $1 * $1 }.squareRoot(), 1e-12)
        return x.map { $0 / n }
    }

    /// SpheroMoE forward (one slot per expert, no noise, softmax combine):
    /// K = l2norm(LN(x)), Q = l2norm(LN(phi)), L = K Q^T, D = softmax over tokens
    /// (L/tau), C = softmax over slots (L/tau), slot inputs S = D^T x, output C Y.
    public static func sphero(phi: [Float], experts: [MLPWeights], tokens: [[Double]], tau: Double) -> [[Double]] {
        let E = experts.count, T = tokens.count, H = tokens.first?.count ?? 0
        let keys = tokens.map { l2normalize(layerNorm($0)) }
        let queries = (0..<E).map { e in l2normalize(layerNorm((0..<H).map { Double(phi[e * H + $0]) })) }
        let L = keys.map { k in queries.map { q in zip(k, q).reduce(0) { $0 + $1.0 * $1.1 } / tau } }
        var slotOut: [[Double]] = []
        for e in 0..<E {
            let d = softmax((0..<T).map { L[$0][e] })
            var s = [Double](repeating: 0, count: H)
            for t in 0..<T { for j in 0..<H { s[j] += d[t] * tokens[t][j] } }
            slotOut.append(mlp(experts[e], s))
        }
        return (0..<T).map { t in
            let c = softmax(L[t])
            var y = [Double](repeating: 0, count: H)
            for e in 0..<E { for j in 0..<H { y[j] += c[e] * slotOut[e][j] } }
            return y
        }
    }

    /// `||a - b|| / ||b||` (absolute when b is zero).
    public static func relativeDifference(_ a: [Double], _ b: [Double]) -> Double {
        Reference.relativeError(a, b)
    }
}
