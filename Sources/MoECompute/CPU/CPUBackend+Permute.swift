import Foundation

/// Dispatch plans, permute and combine on the host: the same stable counting
/// sort and gather forms as Kernels/permute.cl.
extension CPUBackend: PermuteOps {
    public func dispatchPlan(expertIndex: Tensor, gateWeight: Tensor?, config: DispatchConfig, into plan: DispatchPlan) throws {
        try PermuteCheck.plan(expertIndex, gateWeight, config, plan, self)
        let n = expertIndex.count, E = config.experts
        let idx = try i32(expertIndex), dst = try i32(plan.destination), src = try i32(plan.sourceOfRow)
        let counts = try i32(plan.counts), offsets = try i32(plan.offsets)
        let cap = plan.capacity ?? Int.max
        // keep[i]: assignment i survives the capacity limit of its expert.
        var keep = [Bool](repeating: false, count: n)
        var seen = [Int](repeating: 0, count: E)
        for i in 0..<n {
            let e = Int(idx[i])
            guard e >= 0 && e < E else { continue }
            seen[e] += 1
            keep[i] = config.dropPolicy == .position ? seen[e] <= cap : true
        }
        if config.dropPolicy == .probs, plan.capacity != nil, let gateWeight {
            let w = try f32(gateWeight)
            var members = [[Int]](repeating: [], count: E)
            for i in 0..<n { let e = Int(idx[i]); if e >= 0 && e < E { members[e].append(i) } }
            for e in 0..<E where members[e].count > cap {
                // Highest weight first, ties to the earlier assignment; drop the rest.
                let order = members[e].sorted { w[$0] != w[$1] ? w[$0] > w[$1] : $0 < $1 }
                for i in order[cap...] { keep[i] = false }
            }
        }
        // Counting sort: kept rows per expert, exclusive scan, then ranks in token order.
        var kept = [Int](repeating: 0, count: E)
        for i in 0..<n where keep[i] { kept[Int(idx[i])] += 1 }
        offsets[0] = 0
        for e in 0..<E { counts[e] = Int32(kept[e]); offsets[e + 1] = offsets[e] + Int32(kept[e]) }
        var next = (0..<E).map { Int(offsets[$0]) }
        for i in 0..<n {
            if keep[i] {
                let e = Int(idx[i])
                dst[i] = Int32(next[e]); src[next[e]] = Int32(i); next[e] += 1
            } else {
                dst[i] = -1
            }
        }
        for r in Int(offsets[E])..<plan.sourceOfRow.count { src[r] = -1 }
    }

    /// Rows used: offsets[E], clamped to the buffer.
    private func usedRows(_ plan: DispatchPlan, limit: Int) throws -> Int {
        min(max(Int(try i32(plan.offsets)[plan.experts]), 0), limit, plan.sourceOfRow.count)
    }

    public func permute(_ x: Tensor, plan: DispatchPlan, into xp: Tensor) throws {
        let (h, rows) = try PermuteCheck.rows("permute", tokenRows: x, permutedRows: xp, plan, self)
        let px = try f32(x), pxp = try f32(xp), src = try i32(plan.sourceOfRow)
        let s = plan.slotsPerToken, used = try usedRows(plan, limit: rows)
        for r in 0..<used {
            let t = Int(src[r]) / s
            (pxp + r * h).update(from: px + t * h, count: h)
        }
        (pxp + used * h).update(repeating: 0, count: (rows - used) * h)
    }

    public func unpermute(_ dXp: Tensor, plan: DispatchPlan, into dX: Tensor) throws {
        let (h, _) = try PermuteCheck.rows("unpermute", tokenRows: dX, permutedRows: dXp, plan, self)
        try gatherRows(dXp, weights: nil, plan: plan, into: dX, hidden: h)
    }

    public func combine(_ yp: Tensor, weights: Tensor, plan: DispatchPlan, into out: Tensor) throws {
        let (h, _) = try PermuteCheck.rows("combine", tokenRows: out, permutedRows: yp, plan, self)
        try PermuteCheck.weights("combine", weights, plan)
        try gatherRows(yp, weights: weights, plan: plan, into: out, hidden: h)
    }

    /// out[t] = sum_j w[t,j] * rows[dest[t,j]] in slot order (w = 1 when nil).
    private func gatherRows(_ rows: Tensor, weights: Tensor?, plan: DispatchPlan, into out: Tensor, hidden h: Int) throws {
        let pr = try f32(rows), po = try f32(out), dst = try i32(plan.destination)
        let pw = try weights.map { try f32($0) }
        let s = plan.slotsPerToken
        for t in 0..<plan.tokens {
            let o = po + t * h
            o.update(repeating: 0, count: h)
            for j in 0..<s {
                let r = Int(dst[t * s + j])
                guard r >= 0 else { continue }
                let w = pw?[t * s + j] ?? 1
                let y = pr + r * h
                for c in 0..<h { o[c] += w * y[c] }
            }
        }
    }

    public func combineBackward(dOut: Tensor, yp: Tensor, weights: Tensor, plan: DispatchPlan, dYp: Tensor, dWeights: Tensor) throws {
        let (h, rows) = try PermuteCheck.rows("combineBackward", tokenRows: dOut, permutedRows: yp, plan, self)
        try PermuteCheck.weights("combineBackward weights", weights, plan)
        try PermuteCheck.weights("combineBackward dWeights", dWeights, plan)
        try require(dYp.shape == yp.shape && dYp.dtype == .f32, "combineBackward: dYp must be \(yp.shape) f32")
        let pdo = try f32(dOut), pyp = try f32(yp), pw = try f32(weights), pdyp = try f32(dYp), pdw = try f32(dWeights)
        let src = try i32(plan.sourceOfRow), dst = try i32(plan.destination)
        let s = plan.slotsPerToken, used = try usedRows(plan, limit: rows)
        // Weights first, so dYp may share storage with yp. Both loops touch
        // disjoint outputs per index, so they split over the cores.
        let (udo, uyp, uw, udyp, udw) = (UInt(bitPattern: pdo), UInt(bitPattern: pyp), UInt(bitPattern: pw), UInt(bitPattern: pdyp), UInt(bitPattern: pdw))
        let (usrc, udst) = (UInt(bitPattern: src), UInt(bitPattern: dst))
        parallelFor(plan.tokens * s, work: plan.tokens * s * h) { range in
            let pdo = UnsafeMutablePointer<Float>(bitPattern: udo)!, pyp = UnsafeMutablePointer<Float>(bitPattern: uyp)!
            let pdw = UnsafeMutablePointer<Float>(bitPattern: udw)!, dst = UnsafeMutablePointer<Int32>(bitPattern: udst)!
            for i in range {
                let r = Int(dst[i])
                guard r >= 0 else { pdw[i] = 0; continue }
                pdw[i] = CPUBackend.dot(pdo + (i / s) * h, pyp + r * h, h)
            }
        }
        parallelFor(used, work: used * h) { range in
            let pdo = UnsafeMutablePointer<Float>(bitPattern: udo)!, pw = UnsafeMutablePointer<Float>(bitPattern: uw)!
            let pdyp = UnsafeMutablePointer<Float>(bitPattern: udyp)!, src = UnsafeMutablePointer<Int32>(bitPattern: usrc)!
            for r in range {
                let i = Int(src[r]), t = i / s
                let w = pw[i], g = pdo + t * h, d = pdyp + r * h
                for c in 0..<h { d[c] = w * g[c] }
            }
        }
        (pdyp + used * h).update(repeating: 0, count: (rows - used) * h)
    }
}

extension CPUBackend {
    /// Dot product in eight fixed lanes (vectorises; the same order every call).
    @inline(__always)
    static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD8<Float>(repeating: 0)
        var c = 0
        while c + 8 <= n {
            acc += UnsafeRawPointer(a + c).loadUnaligned(as: SIMD8<Float>.self) * UnsafeRawPointer(b + c).loadUnaligned(as: SIMD8<Float>.self)
            c += 8
        }
        var sum = acc.sum()
        while c < n { sum += a[c] * b[c]; c += 1 }
        return sum
    }
}
