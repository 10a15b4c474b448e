import Foundation

/// Routing ops on the host: the same definitions as Kernels/routing.cl, row by
/// row, with float64 accumulators for the sums.
extension CPUBackend: RoutingOps {
    public func gate(logits: Tensor, config c: GateConfig, expertIndex: Tensor, gateWeight: Tensor, probs: Tensor) throws {
        let (T, E) = try RoutingCheck.gate(logits, c, expertIndex, gateWeight, probs)
        let pl = try f32(logits), pi = try i32(expertIndex), pw = try f32(gateWeight), pp = try f32(probs)
        let k = c.k
        let (ul, ui, uw, up) = (UInt(bitPattern: pl), UInt(bitPattern: pi), UInt(bitPattern: pw), UInt(bitPattern: pp))
        // Tokens are independent: split them over the cores (same per-token arithmetic).
        parallelFor(T, work: T * E * 16) { tokens in
            let pl = UnsafeMutablePointer<Float>(bitPattern: ul)!, pi = UnsafeMutablePointer<Int32>(bitPattern: ui)!
            let pw = UnsafeMutablePointer<Float>(bitPattern: uw)!, pp = UnsafeMutablePointer<Float>(bitPattern: up)!
            var noisy = [Float](repeating: 0, count: E)
            var expd = [Double](repeating: 0, count: E)
            var chosen = [Int](repeating: 0, count: k)
            for t in tokens {
                let row = pl + t * E
                for e in 0..<E { noisy[e] = c.jitter.map { row[e] * $0.factor(token: t, expert: e) } ?? row[e] }
                // Softmax over E of the jittered logits.
                let m = noisy.max()!
                var s = 0.0
                for e in 0..<E { expd[e] = exp(Double(noisy[e] - m)); s += expd[e] }
                for e in 0..<E { pp[t * E + e] = Float(expd[e] / s) }
                // k passes of argmax; pass j takes the best expert ordered after pick j-1
                // (order: larger logit first, then lower index), so nothing needs marking.
                for j in 0..<k {
                    var best = -1
                    for e in 0..<E {
                        if j > 0 {
                            let prev = chosen[j - 1]
                            let after = noisy[e] < noisy[prev] || (noisy[e] == noisy[prev] && e > prev)
                            if !after { continue }
                        }
                        if best < 0 || noisy[e] > noisy[best] { best = e }
                    }
                    chosen[j] = max(best, 0)
                }
                switch c.mode {
                case .softmaxThenTopK:
                    var sum = 0.0
                    for j in 0..<k { sum += Double(pp[t * E + chosen[j]]) }
                    for j in 0..<k {
                        let p = Double(pp[t * E + chosen[j]])
                        pw[t * k + j] = Float(c.renormalize ? p / sum : p)
                    }
                case .topKThenSoftmax:
                    let top = noisy[chosen[0]]
                    var sum = 0.0
                    for j in 0..<k { sum += exp(Double(noisy[chosen[j]] - top)) }
                    for j in 0..<k { pw[t * k + j] = Float(exp(Double(noisy[chosen[j]] - top)) / sum) }
                }
                for j in 0..<k { pi[t * k + j] = Int32(chosen[j]) }
            }
        }
    }

    public func gateBackward(config c: GateConfig, expertIndex: Tensor, gateWeight: Tensor, probs: Tensor,
                             dGateWeight: Tensor, dProbs: Tensor?, dLogits: Tensor) throws {
        let (T, E) = try RoutingCheck.gateBackward(c, expertIndex, gateWeight, probs, dGateWeight, dProbs, dLogits)
        let pi = try i32(expertIndex), pw = try f32(gateWeight), pp = try f32(probs), pdw = try f32(dGateWeight)
        let pdp = try dProbs.map { try f32($0) }, pdl = try f32(dLogits)
        let k = c.k
        var dp = [Double](repeating: 0, count: E), dl = [Double](repeating: 0, count: E)
        for t in 0..<T {
            for e in 0..<E { dp[e] = pdp.map { Double($0[t * E + e]) } ?? 0; dl[e] = 0 }
            var wdw = 0.0
            for j in 0..<k { wdw += Double(pw[t * k + j]) * Double(pdw[t * k + j]) }
            switch c.mode {
            case .softmaxThenTopK:
                if c.renormalize {
                    var s = 0.0
                    for j in 0..<k { s += Double(pp[t * E + Int(pi[t * k + j])]) }
                    for j in 0..<k { dp[Int(pi[t * k + j])] += (Double(pdw[t * k + j]) - wdw) / s }
                } else {
                    for j in 0..<k { dp[Int(pi[t * k + j])] += Double(pdw[t * k + j]) }
                }
            case .topKThenSoftmax:
                for j in 0..<k { dl[Int(pi[t * k + j])] += Double(pw[t * k + j]) * (Double(pdw[t * k + j]) - wdw) }
            }
            var pd = 0.0
            for e in 0..<E { pd += Double(pp[t * E + e]) * dp[e] }
            for e in 0..<E {
                let g = dl[e] + Double(pp[t * E + e]) * (dp[e] - pd)
                pdl[t * E + e] = c.jitter.map { Float(g) * $0.factor(token: t, expert: e) } ?? Float(g)
            }
        }
    }

    public func routerProbs(logits: Tensor, probs: Tensor) throws {
        try RoutingCheck.sameShape("routerProbs", logits, probs)
        try softmaxRows(try f32(logits), try f32(probs), rows: logits.shape[0], cols: logits.shape[1])
    }

    func softmaxRows(_ x: UnsafeMutablePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, cols: Int) throws {
        for r in 0..<rows {
            let row = x + r * cols
            var m = -Float.infinity
            for c in 0..<cols { m = max(m, row[c]) }
            var s = 0.0
            for c in 0..<cols { s += exp(Double(row[c] - m)) }
            for c in 0..<cols { y[r * cols + c] = Float(exp(Double(row[c] - m)) / s) }
        }
    }

    public func loadBalancingLoss(probs: Tensor, expertIndex: Tensor, coefficient: Float, loss: Tensor, dProbs: Tensor?) throws {
        let (T, E) = try RoutingCheck.matrix(probs, .f32, "loadBalancingLoss probs")
        let (Ti, k) = try RoutingCheck.matrix(expertIndex, .i32, "loadBalancingLoss expertIndex")
        try require(Ti == T && k >= 1, "loadBalancingLoss: expertIndex \(expertIndex.shape) does not match probs \(probs.shape)")
        try RoutingCheck.scalar(loss, "loadBalancingLoss loss")
        if let dProbs { try RoutingCheck.shape(dProbs, [T, E], .f32, "loadBalancingLoss dProbs") }
        let pp = try f32(probs), pi = try i32(expertIndex)
        var f = [Double](repeating: 0, count: E)
        for i in 0..<T * k { let e = Int(pi[i]); if e >= 0 && e < E { f[e] += 1 } }
        var aux = 0.0
        for e in 0..<E {
            f[e] /= Double(max(T * k, 1))
            var pe = 0.0
            for t in 0..<T { pe += Double(pp[t * E + e]) }
            aux += f[e] * pe / Double(max(T, 1))
        }
        try f32(loss)[0] = Float(Double(E) * aux)
        if let dProbs {
            let pd = try f32(dProbs)
            for e in 0..<E {
                let g = Float(Double(coefficient) * Double(E) * f[e] / Double(max(T, 1)))
                for t in 0..<T { pd[t * E + e] = g }
            }
        }
    }

    public func zLoss(logits: Tensor, coefficient: Float, loss: Tensor, dLogits: Tensor?, accumulate: Bool) throws {
        let (T, E) = try RoutingCheck.matrix(logits, .f32, "zLoss logits")
        try RoutingCheck.scalar(loss, "zLoss loss")
        if let dLogits { try RoutingCheck.shape(dLogits, [T, E], .f32, "zLoss dLogits") }
        let pl = try f32(logits), pd = try dLogits.map { try f32($0) }
        var total = 0.0
        for t in 0..<T {
            let row = pl + t * E
            var m = -Float.infinity
            for e in 0..<E { m = max(m, row[e]) }
            var s = 0.0
            for e in 0..<E { s += exp(Double(row[e] - m)) }
            let lse = Double(m) + log(s)
            total += lse * lse
            if let pd {
                // d/dl_e of coef * lse^2 / T = coef * 2 lse softmax_e / T
                let g = Double(coefficient) * 2 * lse / Double(T)
                for e in 0..<E {
                    let v = Float(g * exp(Double(row[e]) - lse))
                    pd[t * E + e] = accumulate ? pd[t * E + e] + v : v
                }
            }
        }
        try f32(loss)[0] = T > 0 ? Float(total / Double(T)) : 0
    }

    public func expertChoice(probs: Tensor, plan: DispatchPlan, combineWeight: Tensor) throws {
        let (T, E, C) = try RoutingCheck.expertChoice(probs, plan, combineWeight, on: self)
        let pp = try f32(probs), pdst = try i32(plan.destination), psrc = try i32(plan.sourceOfRow)
        let pc = try i32(plan.counts), po = try i32(plan.offsets), pw = try f32(combineWeight)
        for i in 0..<T * E { pdst[i] = -1; pw[i] = 0 }
        for e in 0...E { po[e] = Int32(e * C) }
        for e in 0..<E {
            pc[e] = Int32(C)
            let chosen = (0..<T).sorted {
                let a = pp[$0 * E + e], b = pp[$1 * E + e]
                return a != b ? a > b : $0 < $1
            }.prefix(C).sorted()
            for (r, t) in chosen.enumerated() {
                pdst[t * E + e] = Int32(e * C + r)
                psrc[e * C + r] = Int32(t * E + e)
                pw[t * E + e] = pp[t * E + e]
            }
        }
        for r in E * C..<plan.sourceOfRow.count { psrc[r] = -1 }
    }

    public func expertChoiceBackward(probs: Tensor, destination: Tensor, dCombineWeight: Tensor, dLogits: Tensor) throws {
        try RoutingCheck.sameShape("expertChoiceBackward", probs, dCombineWeight, dLogits)
        try RoutingCheck.shape(destination, probs.shape, .i32, "expertChoiceBackward destination")
        let (T, E) = (probs.shape[0], probs.shape[1])
        let pp = try f32(probs), pdst = try i32(destination), pdw = try f32(dCombineWeight), pdl = try f32(dLogits)
        for t in 0..<T {
            var dot = 0.0
            for e in 0..<E where pdst[t * E + e] >= 0 { dot += Double(pp[t * E + e]) * Double(pdw[t * E + e]) }
            for e in 0..<E {
                let dp = pdst[t * E + e] >= 0 ? Double(pdw[t * E + e]) : 0
                pdl[t * E + e] = Float(Double(pp[t * E + e]) * (dp - dot))
            }
        }
    }

    public func l2NormalizeRows(_ x: Tensor, into y: Tensor, epsilon: Float) throws {
        try RoutingCheck.sameShape("l2NormalizeRows", x, y)
        let (R, D) = (x.shape[0], x.shape[1])
        let px = try f32(x), py = try f32(y)
        // Rows are independent (each in float64, in column order): split over the cores.
        parallelFor(R, work: R * D * 2) { rows in
            for r in rows {
                var ss = 0.0
                for c in 0..<D { ss += Double(px[r * D + c]) * Double(px[r * D + c]) }
                let inv = 1 / max(ss.squareRoot(), Double(epsilon))
                for c in 0..<D { py[r * D + c] = Float(Double(px[r * D + c]) * inv) }
            }
        }
    }

    public func l2NormalizeRowsBackward(x: Tensor, dY: Tensor, dX: Tensor, epsilon: Float) throws {
        try RoutingCheck.sameShape("l2NormalizeRowsBackward", x, dY, dX)
        let (R, D) = (x.shape[0], x.shape[1])
        let px = try f32(x), pdy = try f32(dY), pdx = try f32(dX)
        parallelFor(R, work: R * D * 4) { rows in
            for r in rows {
                var ss = 0.0, dot = 0.0
                for c in 0..<D {
                    ss += Double(px[r * D + c]) * Double(px[r * D + c])
                    dot += Double(px[r * D + c]) * Double(pdy[r * D + c])
                }
                let norm = ss.squareRoot()
                for c in 0..<D {
                    // Clamped norm: y = x / eps is linear; else dx = (dy - x (x.dy)/|x|^2) / |x|.
                    pdx[r * D + c] = norm <= Double(epsilon)
                        ? Float(Double(pdy[r * D + c]) / Double(epsilon))
                        : Float((Double(pdy[r * D + c]) - Double(px[r * D + c]) * dot / ss) / norm)
                }
            }
        }
    }

    public func scaleByTemperature(_ scores: Tensor, temperature: Tensor, into logits: Tensor) throws {
        try RoutingCheck.sameShape("scaleByTemperature", scores, logits)
        try RoutingCheck.scalar(temperature, "scaleByTemperature temperature")
        let ps = try f32(scores), pl = try f32(logits), tau = try f32(temperature)[0]
        for i in 0..<scores.count { pl[i] = ps[i] / tau }
    }

    public func scaleByTemperatureBackward(dLogits: Tensor, logits: Tensor, temperature: Tensor, dScores: Tensor, dTemperature: Tensor) throws {
        try RoutingCheck.sameShape("scaleByTemperatureBackward", dLogits, logits, dScores)
        try RoutingCheck.scalar(temperature, "scaleByTemperatureBackward temperature")
        try RoutingCheck.scalar(dTemperature, "scaleByTemperatureBackward dTemperature")
        let pdl = try f32(dLogits), pl = try f32(logits), pds = try f32(dScores), tau = try f32(temperature)[0]
        var dot = 0.0
        for i in 0..<dLogits.count {
            dot += Double(pdl[i]) * Double(pl[i])
            pds[i] = pdl[i] / tau
        }
        try f32(dTemperature)[0] = Float(-dot / Double(tau))
    }

    public func softmaxOverTokens(_ logits: Tensor, into weights: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverTokens", logits, weights)
        let (T, S) = (logits.shape[0], logits.shape[1])
        let pl = try f32(logits), pw = try f32(weights)
        for s in 0..<S {
            var m = -Float.infinity
            for t in 0..<T { m = max(m, pl[t * S + s]) }
            var sum = 0.0
            for t in 0..<T { sum += exp(Double(pl[t * S + s] - m)) }
            for t in 0..<T { pw[t * S + s] = Float(exp(Double(pl[t * S + s] - m)) / sum) }
        }
    }

    public func softmaxOverTokensBackward(weights: Tensor, dWeights: Tensor, dLogits: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverTokensBackward", weights, dWeights, dLogits)
        let (T, S) = (weights.shape[0], weights.shape[1])
        let py = try f32(weights), pdy = try f32(dWeights), pdx = try f32(dLogits)
        for s in 0..<S {
            var dot = 0.0
            for t in 0..<T { dot += Double(py[t * S + s]) * Double(pdy[t * S + s]) }
            for t in 0..<T { pdx[t * S + s] = Float(Double(py[t * S + s]) * (Double(pdy[t * S + s]) - dot)) }
        }
    }

    public func softmaxOverSlots(_ logits: Tensor, into weights: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverSlots", logits, weights)
        try softmaxRows(try f32(logits), try f32(weights), rows: logits.shape[0], cols: logits.shape[1])
    }

    public func softmaxOverSlotsBackward(weights: Tensor, dWeights: Tensor, dLogits: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverSlotsBackward", weights, dWeights, dLogits)
        let (T, S) = (weights.shape[0], weights.shape[1])
        let py = try f32(weights), pdy = try f32(dWeights), pdx = try f32(dLogits)
        for t in 0..<T {
            var dot = 0.0
            for s in 0..<S { dot += Double(py[t * S + s]) * Double(pdy[t * S + s]) }
            for s in 0..<S { pdx[t * S + s] = Float(Double(py[t * S + s]) * (Double(pdy[t * S + s]) - dot)) }
        }
    }
}
