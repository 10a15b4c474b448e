import Foundation

/// Float64 references for the routing and permute ops: plain loops that follow
/// the definitions in Ops/Routing.swift and Ops/Permute.swift. Matrices are
/// row-major flat arrays.
extension Reference {
    // MARK: - Gate

    public struct GateResult {
        public var expertIndex: [Int32]   // [T,k]
        public var gateWeight: [Double]   // [T,k]
        public var probs: [Double]        // [T,E]
    }

    /// Softmax of one row.
    static func softmax(_ x: [Double]) -> [Double] {
        let m = x.max() ?? 0
        let ex = x.map { exp($0 - m) }
        let s = ex.reduce(0, +)
        return ex.map { $0 / s }
    }

    /// The top-k gate. Selection uses the f32 jittered logits (`Float(logit) * m`
    /// rounded to f32, as the backends compute them), so indices match exactly;
    /// values use `logit * m` in float64.
    public static func gate(logits: [Double], tokens: Int, experts: Int, config c: GateConfig) -> GateResult {
        let k = c.k
        var r = GateResult(expertIndex: [Int32](repeating: 0, count: tokens * k),
                           gateWeight: [Double](repeating: 0, count: tokens * k),
                           probs: [Double](repeating: 0, count: tokens * experts))
        for t in 0..<tokens {
            var noisy = [Double](repeating: 0, count: experts)
            var keys = [Float](repeating: 0, count: experts)
            for e in 0..<experts {
                let l = logits[t * experts + e]
                let m = c.jitter?.factor(token: t, expert: e) ?? 1
                noisy[e] = l * Double(m)
                keys[e] = Float(l) * m
            }
            let p = softmax(noisy)
            for e in 0..<experts { r.probs[t * experts + e] = p[e] }
            // Largest key first, ties to the lower expert index.
            let order = (0..<experts).sorted { keys[$0] != keys[$1] ? keys[$0] > keys[$1] : $0 < $1 }
            let chosen = Array(order.prefix(k))
            var w: [Double]
            switch c.mode {
            case .softmaxThenTopK:
                w = chosen.map { p[$0] }
                if c.renormalize { let s = w.reduce(0, +); w = w.map { $0 / s } }
            case .topKThenSoftmax:
                w = softmax(chosen.map { noisy[$0] })
            }
            for j in 0..<k {
                r.expertIndex[t * k + j] = Int32(chosen[j])
                r.gateWeight[t * k + j] = w[j]
            }
        }
        return r
    }

    /// dLogits [T,E] for the gate with the selection in `expertIndex` held fixed.
    public static func gateBackward(config c: GateConfig, tokens: Int, experts: Int, expertIndex: [Int32],
                                    gateWeight: [Double], probs: [Double], dGateWeight: [Double], dProbs: [Double]?) -> [Double] {
        let k = c.k
        var out = [Double](repeating: 0, count: tokens * experts)
        for t in 0..<tokens {
            let p = Array(probs[t * experts..<(t + 1) * experts])
            let w = Array(gateWeight[t * k..<(t + 1) * k])
            let dw = Array(dGateWeight[t * k..<(t + 1) * k])
            let idx = expertIndex[t * k..<(t + 1) * k].map { Int($0) }
            var dp = dProbs.map { Array($0[t * experts..<(t + 1) * experts]) } ?? [Double](repeating: 0, count: experts)
            var dl = [Double](repeating: 0, count: experts)
            switch c.mode {
            case .softmaxThenTopK:
                if c.renormalize {
                    // w_j = p_j / s: dp_j = (dw_j - sum_i dw_i w_i) / s
                    let s = idx.reduce(0.0) { $0 + p[$1] }
                    let dot = zip(dw, w).reduce(0.0) { $0 + $1.0 * $1.1 }
                    for j in 0..<k { dp[idx[j]] += (dw[j] - dot) / s }
                } else {
                    for j in 0..<k { dp[idx[j]] += dw[j] }
                }
            case .topKThenSoftmax:
                let dot = zip(dw, w).reduce(0.0) { $0 + $1.0 * $1.1 }
                for j in 0..<k { dl[idx[j]] += w[j] * (dw[j] - dot) }
            }
            let pdp = zip(p, dp).reduce(0.0) { $0 + $1.0 * $1.1 }
            for e in 0..<experts {
                let m = Double(c.jitter?.factor(token: t, expert: e) ?? 1)
                out[t * experts + e] = (dl[e] + p[e] * (dp[e] - pdp)) * m
            }
        }
        return out
    }

    // MARK: - Auxiliary losses

    /// Switch loss `E * sum_e f_e P_e` and `d/dprobs` (f held constant), unscaled.
    public static func loadBalancingLoss(probs: [Double], expertIndex: [Int32], tokens: Int, experts: Int, k: Int) -> (loss: Double, dProbs: [Double]) {
        guard tokens > 0 else { return (0, []) }
        var f = [Double](repeating: 0, count: experts)
        for i in expertIndex where i >= 0 && Int(i) < experts { f[Int(i)] += 1 }
        f = f.map { $0 / Double(tokens * k) }
        var loss = 0.0
        for e in 0..<experts {
            var pe = 0.0
            for t in 0..<tokens { pe += probs[t * experts + e] }
            loss += f[e] * pe / Double(tokens)
        }
        var d = [Double](repeating: 0, count: tokens * experts)
        for t in 0..<tokens { for e in 0..<experts { d[t * experts + e] = Double(experts) * f[e] / Double(tokens) } }
        return (Double(experts) * loss, d)
    }

    /// `mean_t logsumexp(logits_t)^2` and its gradient, unscaled.
    public static func zLoss(logits: [Double], tokens: Int, experts: Int) -> (loss: Double, dLogits: [Double]) {
        guard tokens > 0 else { return (0, []) }
        var loss = 0.0
        var d = [Double](repeating: 0, count: tokens * experts)
        for t in 0..<tokens {
            let row = Array(logits[t * experts..<(t + 1) * experts])
            let m = row.max()!
            let lse = m + log(row.reduce(0.0) { $0 + exp($1 - m) })
            loss += lse * lse
            for e in 0..<experts { d[t * experts + e] = 2 * lse * exp(row[e] - lse) / Double(tokens) }
        }
        return (loss / Double(tokens), d)
    }

    // MARK: - Dispatch plans

    public struct Plan: Equatable {
        public var counts: [Int32]
        public var offsets: [Int32]
        public var destination: [Int32]
        public var sourceOfRow: [Int32]
        public init(counts: [Int32], offsets: [Int32], destination: [Int32], sourceOfRow: [Int32]) {
            self.counts = counts; self.offsets = offsets; self.destination = destination; self.sourceOfRow = sourceOfRow
        }
    }

    /// Top-k dispatch plan: stable by token order; `sourceOfRow` has T*k entries, -1 past offsets[E].
    public static func dispatchPlan(expertIndex: [Int32], gateWeight: [Double]?, tokens: Int, k: Int, config: DispatchConfig) -> Plan {
        let n = tokens * k, E = config.experts
        let cap = config.capacity.perExpert(tokens: tokens, k: k, experts: E)
        var members = [[Int]](repeating: [], count: E)
        for i in 0..<n where expertIndex[i] >= 0 && Int(expertIndex[i]) < E { members[Int(expertIndex[i])].append(i) }
        var kept = [[Int]](repeating: [], count: E)
        for e in 0..<E {
            guard let c = cap, members[e].count > c else { kept[e] = members[e]; continue }
            switch config.dropPolicy {
            case .position:
                kept[e] = Array(members[e].prefix(c))
            case .probs:
                let w = gateWeight!
                let best = members[e].sorted { w[$0] != w[$1] ? w[$0] > w[$1] : $0 < $1 }.prefix(c)
                kept[e] = best.sorted()
            }
        }
        var plan = Plan(counts: kept.map { Int32($0.count) }, offsets: [0], destination: [Int32](repeating: -1, count: n),
                        sourceOfRow: [Int32](repeating: -1, count: n))
        for e in 0..<E {
            let base = Int(plan.offsets[e])
            for (r, i) in kept[e].enumerated() {
                plan.destination[i] = Int32(base + r)
                plan.sourceOfRow[base + r] = Int32(i)
            }
            plan.offsets.append(Int32(base + kept[e].count))
        }
        return plan
    }

    /// Expert choice on `probs [T,E]`: plan with S = E and the combine weights.
    public static func expertChoice(probs: [Double], tokens: Int, experts: Int, capacity: Int) -> (plan: Plan, combineWeight: [Double]) {
        let c = min(capacity, tokens)
        var plan = Plan(counts: [Int32](repeating: Int32(c), count: experts), offsets: (0...experts).map { Int32($0 * c) },
                        destination: [Int32](repeating: -1, count: tokens * experts),
                        sourceOfRow: [Int32](repeating: -1, count: experts * c))
        var w = [Double](repeating: 0, count: tokens * experts)
        for e in 0..<experts {
            let best = (0..<tokens).sorted {
                let a = probs[$0 * experts + e], b = probs[$1 * experts + e]
                return a != b ? a > b : $0 < $1
            }.prefix(c).sorted()
            for (r, t) in best.enumerated() {
                plan.destination[t * experts + e] = Int32(e * c + r)
                plan.sourceOfRow[e * c + r] = Int32(t * experts + e)
                w[t * experts + e] = probs[t * experts + e]
            }
        }
        return (plan, w)
    }

    /// Softmax over E of each row of `logits`.
    public static func rowSoftmax(_ x: [Double], rows: Int, cols: Int) -> [Double] {
        (0..<rows).flatMap { softmax(Array(x[$0 * cols..<($0 + 1) * cols])) }
    }

    /// Backward of a row softmax: `dx = y * (dy - sum(y * dy))` per row.
    public static func rowSoftmaxBackward(y: [Double], dy: [Double], rows: Int, cols: Int) -> [Double] {
        var dx = [Double](repeating: 0, count: rows * cols)
        for r in 0..<rows {
            var dot = 0.0
            for c in 0..<cols { dot += y[r * cols + c] * dy[r * cols + c] }
            for c in 0..<cols { dx[r * cols + c] = y[r * cols + c] * (dy[r * cols + c] - dot) }
        }
        return dx
    }

    public static func expertChoiceBackward(probs: [Double], destination: [Int32], dCombineWeight: [Double], tokens: Int, experts: Int) -> [Double] {
        let dp = (0..<tokens * experts).map { destination[$0] >= 0 ? dCombineWeight[$0] : 0 }
        return rowSoftmaxBackward(y: probs, dy: dp, rows: tokens, cols: experts)
    }

    // MARK: - Permute and combine

    /// `xp [rows,H]`: source rows for r < offsets[E], zero after.
    public static func permute(x: [Double], hidden h: Int, plan: Plan, slots s: Int, rows: Int) -> [Double] {
        var xp = [Double](repeating: 0, count: rows * h)
        let used = Int(plan.offsets.last!)
        for r in 0..<min(used, rows) {
            let t = Int(plan.sourceOfRow[r]) / s
            for c in 0..<h { xp[r * h + c] = x[t * h + c] }
        }
        return xp
    }

    /// `out[t] = sum_j w[t,j] * yp[dest[t,j]]` (w = nil: all ones, the unpermute).
    public static func combine(yp: [Double], weights: [Double]?, hidden h: Int, plan: Plan, tokens: Int, slots s: Int) -> [Double] {
        var out = [Double](repeating: 0, count: tokens * h)
        for t in 0..<tokens {
            for j in 0..<s {
                let r = Int(plan.destination[t * s + j])
                guard r >= 0 else { continue }
                let w = weights?[t * s + j] ?? 1
                for c in 0..<h { out[t * h + c] += w * yp[r * h + c] }
            }
        }
        return out
    }

    public static func combineBackward(dOut: [Double], yp: [Double], weights: [Double], hidden h: Int, plan: Plan,
                                       tokens: Int, slots s: Int, rows: Int) -> (dYp: [Double], dWeights: [Double]) {
        var dyp = [Double](repeating: 0, count: rows * h)
        var dw = [Double](repeating: 0, count: tokens * s)
        for t in 0..<tokens {
            for j in 0..<s {
                let r = Int(plan.destination[t * s + j])
                guard r >= 0 else { continue }
                var dot = 0.0
                for c in 0..<h {
                    dyp[r * h + c] = weights[t * s + j] * dOut[t * h + c]
                    dot += dOut[t * h + c] * yp[r * h + c]
                }
                dw[t * s + j] = dot
            }
        }
        return (dyp, dw)
    }

    // MARK: - Hyperspherical routing

    public static func l2NormalizeRows(_ x: [Double], rows: Int, cols: Int, epsilon: Double) -> [Double] {
        var y = x
        for r in 0..<rows {
            let n = max((0..<cols).reduce(0.0) { $0 + x[r * cols + $1] * x[r * cols + $1] }.squareRoot(), epsilon)
            for c in 0..<cols { y[r * cols + c] = x[r * cols + c] / n }
        }
        return y
    }

    public static func l2NormalizeRowsBackward(x: [Double], dY: [Double], rows: Int, cols: Int, epsilon: Double) -> [Double] {
        var dx = x
        for r in 0..<rows {
            let norm = (0..<cols).reduce(0.0) { $0 + x[r * cols + $1] * x[r * cols + $1] }.squareRoot()
            if norm <= epsilon {
                // y = x / eps: a linear map.
                for c in 0..<cols { dx[r * cols + c] = dY[r * cols + c] / epsilon }
            } else {
                let dot = (0..<cols).reduce(0.0) { $0 + x[r * cols + $1] * dY[r * cols + $1] }
                for c in 0..<cols {
                    dx[r * cols + c] = (dY[r * cols + c] - x[r * cols + c] * dot / (norm * norm)) / norm
                }
            }
        }
        return dx
    }

    /// Softmax down each column of `x [rows, cols]`.
    public static func columnSoftmax(_ x: [Double], rows: Int, cols: Int) -> [Double] {
        var y = x
        for c in 0..<cols {
            let col = softmax((0..<rows).map { x[$0 * cols + c] })
            for r in 0..<rows { y[r * cols + c] = col[r] }
        }
        return y
    }

    public static func columnSoftmaxBackward(y: [Double], dy: [Double], rows: Int, cols: Int) -> [Double] {
        var dx = y
        for c in 0..<cols {
            var dot = 0.0
            for r in 0..<rows { dot += y[r * cols + c] * dy[r * cols + c] }
            for r in 0..<rows { dx[r * cols + c] = y[r * cols + c] * (dy[r * cols + c] - dot) }
        }
        return dx
    }
}
