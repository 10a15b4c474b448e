import Foundation

/// Fused attention on the host. Forward: one parallel loop over (batch, query
/// head) tiles; each query row gets its scaled scores against the visible keys
/// (from a per-tile transposed K, see the row helpers) in a per-thread scratch
/// row, the max-subtracted exps eight lanes at a time, and the weighted sum of V
/// rows written straight into its O row. Backward: one parallel loop over
/// (batch, kv head) tiles, so a tile owns the dK/dV rows of its kv head and sums
/// the query heads of its group into them in a fixed order (no races,
/// deterministic); the probabilities come back from the saved log-sum-exp.
/// Scratch is allocated once per thread and call, not per tile.
extension CPUBackend: AttentionOps {
    // MARK: Row helpers
    //
    // Scores are dot products of a query row with many key rows. Computed one key
    // at a time each needs a horizontal sum (slow for head dims of 16-64), so each
    // tile transposes its K (and for the backward V) once into `d x Tkp` scratch
    // (Tkp = Tk rounded up to 8, the padding zero): eight keys' scores are then
    // eight lanes of `sum_c x_c * kT[c, j..<j+8]`, plain FMAs. Weighted sums of
    // rows (`P V`, `dS K`) keep their accumulators in registers, 16 columns and
    // two keys at a time (four independent FMA chains).

    /// The row stride of a transposed K or V: keys rounded up to whole groups of
    /// eight, plus eight more when that is a multiple of 32 (rows a power-of-two
    /// number of bytes apart share cache sets: 2.5x slower at Tk = 1024).
    @inline(__always)
    static func attnPadded(_ n: Int) -> Int {
        let p = (n + 7) / 8 * 8
        return p % 32 == 0 ? p + 8 : p
    }

    /// `t[c * ldt + j] = rows[j * ld + c]` for j < n, c < d; columns n..<ldt zeroed.
    @inline(__always)
    static func attnTranspose(_ rows: UnsafePointer<Float>, ld: Int, n: Int, d: Int, into t: UnsafeMutablePointer<Float>, ldt: Int) {
        for c in 0..<d {
            let tc = t + c * ldt
            for j in 0..<n { tc[j] = rows[j * ld + c] }
            for j in n..<ldt { tc[j] = 0 }
        }
    }

    /// `s[j] = scale * sum_c x[c] * t[c * ldt + j]` for the first `blocks` groups of eight j.
    @inline(__always)
    static func attnScores(_ x: UnsafePointer<Float>, _ t: UnsafePointer<Float>, ldt: Int, d: Int, blocks: Int, scale: Float,
                           into s: UnsafeMutablePointer<Float>) {
        var blk = 0
        while blk + 2 <= blocks {
            let j = blk * 8
            var a0 = SIMD8<Float>(repeating: 0), a1 = a0, b0 = a0, b1 = a0
            var c = 0
            while c + 2 <= d {
                let x0 = SIMD8<Float>(repeating: x[c]), x1 = SIMD8<Float>(repeating: x[c + 1])
                let r0 = t + c * ldt + j, r1 = r0 + ldt
                a0 = a0.addingProduct(x0, load8(r0, 0)); b0 = b0.addingProduct(x0, load8(r0, 8))
                a1 = a1.addingProduct(x1, load8(r1, 0)); b1 = b1.addingProduct(x1, load8(r1, 8))
                c += 2
            }
            if c < d {
                let x0 = SIMD8<Float>(repeating: x[c]), r0 = t + c * ldt + j
                a0 = a0.addingProduct(x0, load8(r0, 0)); b0 = b0.addingProduct(x0, load8(r0, 8))
            }
            store8(s, j, (a0 + a1) * scale)
            store8(s, j + 8, (b0 + b1) * scale)
            blk += 2
        }
        if blk < blocks {
            let j = blk * 8
            var a0 = SIMD8<Float>(repeating: 0), a1 = a0
            var c = 0
            while c + 2 <= d {
                a0 = a0.addingProduct(SIMD8<Float>(repeating: x[c]), load8(t + c * ldt, j))
                a1 = a1.addingProduct(SIMD8<Float>(repeating: x[c + 1]), load8(t + (c + 1) * ldt, j))
                c += 2
            }
            if c < d { a0 = a0.addingProduct(SIMD8<Float>(repeating: x[c]), load8(t + c * ldt, j)) }
            store8(s, j, (a0 + a1) * scale)
        }
    }

    /// 1 in the first `count` lanes, 0 in the others. Float arithmetic: a SIMDMask
    /// from an integer compare was built lane by lane through the stack (half the
    /// time of the exp loop).
    @inline(__always)
    static func attnKeep(_ count: Int) -> SIMD8<Float> {
        let lanes = SIMD8<Float>(0, 1, 2, 3, 4, 5, 6, 7)
        return min8(max8(SIMD8<Float>(repeating: Float(count)) - lanes, SIMD8(repeating: 0)), SIMD8(repeating: 1))
    }

    @inline(__always)
    static func attnHorizontalMax(_ v: SIMD8<Float>) -> Float {
        let m4 = max8(v, SIMD8(v[4], v[5], v[6], v[7], v[0], v[1], v[2], v[3]))
        return Swift.max(Swift.max(m4[0], m4[1]), Swift.max(m4[2], m4[3]))
    }

    /// The maximum of `s[0..<n]` (n > 0).
    @inline(__always)
    static func attnMax(_ s: UnsafePointer<Float>, _ n: Int) -> Float {
        var m8 = SIMD8<Float>(repeating: -.infinity)
        var j = 0
        while j + 8 <= n { m8 = max8(m8, load8(s, j)); j += 8 }
        if j < n {
            // Lanes past n become -3e38 (not -inf: 0 * -inf is NaN); lane 0 is valid, so the max is unchanged.
            let keep = attnKeep(n - j)
            m8 = max8(m8, load8(s, j) * keep + (keep - 1) * 3e38)
        }
        return attnHorizontalMax(m8)
    }

    /// `s[j] = exp(s[j] - shift)` for j < n and 0 for the rest of the last group of
    /// eight, in place; returns the sum over j < n.
    @inline(__always)
    static func attnExp(_ s: UnsafeMutablePointer<Float>, _ n: Int, minus shift: Float) -> Float {
        let m8 = SIMD8<Float>(repeating: shift)
        var acc = SIMD8<Float>(repeating: 0)
        var j = 0
        while j + 8 <= n {
            let e = exp8(load8(s, j) - m8)
            store8(s, j, e); acc += e; j += 8
        }
        if j < n {
            // exp8 saturates (finite), so the products with 0 are 0.
            let e = exp8(load8(s, j) - m8) * attnKeep(n - j)
            store8(s, j, e); acc += e
        }
        return (acc.lowHalf + acc.highHalf).sum()
    }

    /// `out[c] = alpha * sum_{j < n} w[j] * rows[j * ld + c]` for c < d.
    @inline(__always)
    static func attnCombine(_ w: UnsafePointer<Float>, _ rows: UnsafePointer<Float>, ld: Int, n: Int, d: Int, alpha: Float,
                            into out: UnsafeMutablePointer<Float>) {
        var c = 0
        while c + 16 <= d {
            var a0 = SIMD8<Float>(repeating: 0), a1 = a0, b0 = a0, b1 = a0
            var j = 0
            while j + 2 <= n {
                let w0 = SIMD8<Float>(repeating: w[j]), w1 = SIMD8<Float>(repeating: w[j + 1])
                let r0 = rows + j * ld + c, r1 = r0 + ld
                a0 = a0.addingProduct(w0, load8(r0, 0)); b0 = b0.addingProduct(w0, load8(r0, 8))
                a1 = a1.addingProduct(w1, load8(r1, 0)); b1 = b1.addingProduct(w1, load8(r1, 8))
                j += 2
            }
            if j < n {
                let w0 = SIMD8<Float>(repeating: w[j]), r0 = rows + j * ld + c
                a0 = a0.addingProduct(w0, load8(r0, 0)); b0 = b0.addingProduct(w0, load8(r0, 8))
            }
            store8(out, c, (a0 + a1) * alpha)
            store8(out, c + 8, (b0 + b1) * alpha)
            c += 16
        }
        if c + 8 <= d {
            var a0 = SIMD8<Float>(repeating: 0), a1 = a0
            var j = 0
            while j + 2 <= n {
                a0 = a0.addingProduct(SIMD8<Float>(repeating: w[j]), load8(rows + j * ld, c))
                a1 = a1.addingProduct(SIMD8<Float>(repeating: w[j + 1]), load8(rows + (j + 1) * ld, c))
                j += 2
            }
            if j < n { a0 = a0.addingProduct(SIMD8<Float>(repeating: w[j]), load8(rows + j * ld, c)) }
            store8(out, c, (a0 + a1) * alpha)
            c += 8
        }
        while c < d {
            var a: Float = 0
            for j in 0..<n { a += w[j] * rows[j * ld + c] }
            out[c] = a * alpha
            c += 1
        }
    }

    @inline(__always)
    static func attnDot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ d: Int) -> Float {
        laneSum(d, { load8(a, $0) * load8(b, $0) }, { a[$0] * b[$0] })
    }

    /// `y += alpha * x` over d elements.
    @inline(__always)
    static func attnAxpy(_ y: UnsafeMutablePointer<Float>, _ alpha: Float, _ x: UnsafePointer<Float>, _ d: Int) {
        let a8 = SIMD8<Float>(repeating: alpha)
        var c = 0
        while c + 8 <= d { store8(y, c, load8(y, c).addingProduct(a8, load8(x, c))); c += 8 }
        while c < d { y[c] += alpha * x[c]; c += 1 }
    }

    // MARK: AttentionOps

    public func attention(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor) throws {
        try AttentionCheck.forward(c, q: q, k: k, v: v, out: out, logSumExp: logSumExp)
        let pq = try f32(q), pk = try f32(k), pv = try f32(v), po = try f32(out), pl = try f32(logSumExp)
        let (hq, tq, tk, d) = (c.queryHeads, c.queryLength, c.keyLength, c.headDim)
        let group = c.group, scale = c.scale
        let tiles = c.batch * hq
        guard tiles > 0, tq > 0 else { counters.launch(); return }
        let tkp = Self.attnPadded(tk)
        parallelFor(tiles, work: tiles * tq * max(tk, 1) * d) { range in
            // Per thread: K^T of the current kv head (d x tkp) and one score row.
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: (d + 1) * tkp + 8)
            defer { scratch.deallocate() }
            let kT = scratch, s = scratch + d * tkp
            var transposed = -1
            for tile in range {
                let b = tile / hq, h = tile % hq, g = h / group
                let kb = pk + b * c.batchStrideK + g * d, vb = pv + b * c.batchStrideV + g * d
                // Consecutive query heads of a group share K^T.
                if transposed != b * c.kvHeads + g {
                    Self.attnTranspose(kb, ld: c.ldk, n: tk, d: d, into: kT, ldt: tkp)
                    transposed = b * c.kvHeads + g
                }
                for i in 0..<tq {
                    let qr = pq + b * c.batchStrideQ + i * c.ldq + h * d
                    let or = po + b * c.batchStrideO + i * c.ldo + h * d
                    let n = c.visibleKeys(i)
                    guard n > 0 else {
                        or.update(repeating: 0, count: d)
                        pl[tile * tq + i] = -.infinity
                        continue
                    }
                    Self.attnScores(qr, kT, ldt: tkp, d: d, blocks: (n + 7) / 8, scale: scale, into: s)
                    let m = Self.attnMax(s, n)
                    let sum = Self.attnExp(s, n, minus: m)
                    Self.attnCombine(s, vb, ld: c.ldv, n: n, d: d, alpha: 1 / sum, into: or)
                    pl[tile * tq + i] = m + Foundation.log(sum)
                }
            }
        }
    }

    public func attentionBackward(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor,
                                  dOut: Tensor, dQ: Tensor, dK: Tensor, dV: Tensor) throws {
        try AttentionCheck.backward(c, q: q, k: k, v: v, out: out, logSumExp: logSumExp, dOut: dOut, dQ: dQ, dK: dK, dV: dV)
        let pq = try f32(q), pk = try f32(k), pv = try f32(v), po = try f32(out), pl = try f32(logSumExp)
        let pdo = try f32(dOut), pdq = try f32(dQ), pdk = try f32(dK), pdv = try f32(dV)
        let (hq, hkv, tq, tk, d) = (c.queryHeads, c.kvHeads, c.queryLength, c.keyLength, c.headDim)
        let group = c.group, scale = c.scale
        let tiles = c.batch * hkv
        guard tiles > 0 else { counters.launch(); return }
        let tkp = Self.attnPadded(tk)
        parallelFor(tiles, work: c.batch * hq * max(tq, 1) * max(tk, 1) * d * 2) { range in
            // Per thread: K^T and V^T of the tile's kv head, the probabilities p of one
            // query row and their score gradients ds (scale included).
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: (2 * d + 2) * tkp + 8)
            defer { scratch.deallocate() }
            let kT = scratch, vT = scratch + d * tkp, p = scratch + 2 * d * tkp, ds = p + tkp
            for tile in range {
                let b = tile / hkv, g = tile % hkv
                let kb = pk + b * c.batchStrideK + g * d, vb = pv + b * c.batchStrideV + g * d
                let dkb = pdk + b * c.batchStrideK + g * d, dvb = pdv + b * c.batchStrideV + g * d
                Self.attnTranspose(kb, ld: c.ldk, n: tk, d: d, into: kT, ldt: tkp)
                Self.attnTranspose(vb, ld: c.ldv, n: tk, d: d, into: vT, ldt: tkp)
                for j in 0..<tk {
                    (dkb + j * c.ldk).update(repeating: 0, count: d)
                    (dvb + j * c.ldv).update(repeating: 0, count: d)
                }
                for h in (g * group)..<((g + 1) * group) {
                    for i in 0..<tq {
                        let qr = pq + b * c.batchStrideQ + i * c.ldq + h * d
                        let dqr = pdq + b * c.batchStrideQ + i * c.ldq + h * d
                        let or = po + b * c.batchStrideO + i * c.ldo + h * d
                        let dor = pdo + b * c.batchStrideO + i * c.ldo + h * d
                        let n = c.visibleKeys(i)
                        guard n > 0 else { dqr.update(repeating: 0, count: d); continue }
                        let lse = pl[(b * hq + h) * tq + i]
                        let blocks = (n + 7) / 8
                        // P_ij = exp(scale q_i . k_j - L_i); 0 past n in the last group of eight.
                        Self.attnScores(qr, kT, ldt: tkp, d: d, blocks: blocks, scale: scale, into: p)
                        _ = Self.attnExp(p, n, minus: lse)
                        // dP_ij = dO_i . v_j; dS_ij = scale P_ij (dP_ij - D_i), D_i = dO_i . O_i.
                        Self.attnScores(dor, vT, ldt: tkp, d: d, blocks: blocks, scale: 1, into: ds)
                        let delta = SIMD8<Float>(repeating: Self.attnDot(dor, or, d))
                        for blk in 0..<blocks {
                            Self.store8(ds, blk * 8, scale * Self.load8(p, blk * 8) * (Self.load8(ds, blk * 8) - delta))
                        }
                        Self.attnCombine(ds, kb, ld: c.ldk, n: n, d: d, alpha: 1, into: dqr)
                        for j in 0..<n {
                            Self.attnAxpy(dkb + j * c.ldk, ds[j], qr, d)
                            Self.attnAxpy(dvb + j * c.ldv, p[j], dor, d)
                        }
                    }
                }
            }
        }
    }
}
