import Foundation

/// Float64 reference for the fused attention op (`AttentionOps`): the softmax
/// written out per row, probabilities materialised. Arrays are in the layouts of
/// `AttentionConfig` (element 0 = the tensor's first element); elements outside
/// the heads' columns are 0 in the outputs.
extension Reference {
    /// Scaled scores of query `i` (head `h`, batch `b`) against its visible keys.
    private static func attentionScores(_ c: AttentionConfig, q: [Double], k: [Double], b: Int, h: Int, i: Int) -> [Double] {
        let d = c.headDim, g = h / (c.queryHeads / c.kvHeads)
        let qBase = b * c.batchStrideQ + i * c.ldq + h * d
        return (0..<c.visibleKeys(i)).map { j in
            let kBase = b * c.batchStrideK + j * c.ldk + g * d
            var s = 0.0
            for x in 0..<d { s += q[qBase + x] * k[kBase + x] }
            return Double(c.scale) * s
        }
    }

    /// `out` (extent of O's layout) and `logSumExp` (`[B, Hq, Tq]`, -inf for a
    /// query that sees no key, whose output row is 0).
    public static func attention(_ c: AttentionConfig, q: [Double], k: [Double], v: [Double])
        -> (out: [Double], logSumExp: [Double]) {
        let d = c.headDim, group = c.queryHeads / c.kvHeads
        var out = [Double](repeating: 0, count: c.extentO)
        var lse = [Double](repeating: 0, count: c.batch * c.queryHeads * c.queryLength)
        for b in 0..<c.batch {
            for h in 0..<c.queryHeads {
                for i in 0..<c.queryLength {
                    let s = attentionScores(c, q: q, k: k, b: b, h: h, i: i)
                    let li = (b * c.queryHeads + h) * c.queryLength + i
                    guard let m = s.max() else { lse[li] = -.infinity; continue }
                    let e = s.map { exp($0 - m) }
                    let sum = e.reduce(0, +)
                    lse[li] = m + log(sum)
                    let oBase = b * c.batchStrideO + i * c.ldo + h * d
                    for (j, ej) in e.enumerated() {
                        let vBase = b * c.batchStrideV + j * c.ldv + (h / group) * d
                        for x in 0..<d { out[oBase + x] += ej / sum * v[vBase + x] }
                    }
                }
            }
        }
        return (out, lse)
    }

    /// Gradients of `sum(dOut * out)` with respect to q, k, v (in their layouts),
    /// from the probabilities recomputed in float64:
    /// `dV_j = sum_i P_ij dO_i`, `dS_ij = P_ij (dO_i . v_j - sum_l P_il dO_i . v_l)`,
    /// `dQ_i = scale sum_j dS_ij k_j`, `dK_j = scale sum_i dS_ij q_i` (summed over the
    /// query heads of a kv group).
    public static func attentionBackward(_ c: AttentionConfig, q: [Double], k: [Double], v: [Double], dOut: [Double])
        -> (dq: [Double], dk: [Double], dv: [Double]) {
        let d = c.headDim, group = c.queryHeads / c.kvHeads
        var dq = [Double](repeating: 0, count: c.extentQ)
        var dk = [Double](repeating: 0, count: c.extentK), dv = [Double](repeating: 0, count: c.extentV)
        for b in 0..<c.batch {
            for h in 0..<c.queryHeads {
                let g = h / group
                for i in 0..<c.queryLength {
                    let s = attentionScores(c, q: q, k: k, b: b, h: h, i: i)
                    guard let m = s.max() else { continue }
                    let e = s.map { exp($0 - m) }
                    let sum = e.reduce(0, +)
                    let p = e.map { $0 / sum }
                    let qBase = b * c.batchStrideQ + i * c.ldq + h * d
                    let oBase = b * c.batchStrideO + i * c.ldo + h * d
                    let dp = (0..<p.count).map { j -> Double in
                        let vBase = b * c.batchStrideV + j * c.ldv + g * d
                        return (0..<d).reduce(0.0) { $0 + dOut[oBase + $1] * v[vBase + $1] }
                    }
                    let mean = zip(p, dp).reduce(0.0) { $0 + $1.0 * $1.1 }
                    for j in 0..<p.count {
                        let ds = p[j] * (dp[j] - mean) * Double(c.scale)
                        let kBase = b * c.batchStrideK + j * c.ldk + g * d
                        let vBase = b * c.batchStrideV + j * c.ldv + g * d
                        for x in 0..<d {
                            dq[qBase + x] += ds * k[kBase + x]
                            dk[kBase + x] += ds * q[qBase + x]
                            dv[vBase + x] += p[j] * dOut[oBase + x]
                        }
                    }
                }
            }
        }
        return (dq, dk, dv)
    }
}
