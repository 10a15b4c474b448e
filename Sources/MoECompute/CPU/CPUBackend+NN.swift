import Foundation
import CKernels

/// `NNOps` on the host: the hot loops (activations, norms, softmax, cross-entropy,
/// column sums) are C in CKernels (elementwise.c), vectorised for AVX-512 / AVX2
/// by run-time dispatch; each call here handles one contiguous range, split over
/// the cores by rows when the work is large. Reductions over rows are split by
/// columns instead, so every column is summed in a fixed order whatever the
/// thread count: deterministic.
extension CPUBackend {
    /// Elements below which an op runs on the calling thread.
    static let parallelThreshold = 1 << 15

    /// Runs `body` over `0..<count` split into contiguous ranges, one per core
    /// when `work` (elements touched) is large enough to pay for the threads.
    /// Each call counts as one launch (`counters`), whether or not it forks.
    func parallelFor(_ count: Int, work: Int, _ body: (Range<Int>) -> Void) {
        counters.launch()
        let threads = work >= Self.parallelThreshold ? min(count, Self.cores) : 1
        if threads <= 1 {
            if count > 0 { body(0..<count) }
            return
        }
        // Four parts per thread: a thread that is descheduled (a busy shared machine)
        // leaves its later parts to the others. The split depends only on the sizes.
        let parts = min(count, threads * 4)
        Self.parallel(parts) { t in body((t * count / parts)..<((t + 1) * count / parts)) }
    }

    @inline(__always)
    static func store(_ p: UnsafeMutablePointer<Float>, _ i: Int, _ v: Float, _ accumulate: Bool) {
        if accumulate { p[i] += v } else { p[i] = v }
    }

    /// Runs `body` over column ranges of `0..<cols` split across the cores in
    /// multiples of 16 columns (one AVX-512 register), for the column sums: each
    /// column is summed in the same fixed order (blocks of 64 rows into a partial,
    /// partials added in order; see `ck_sum_rows`) whatever the split, so results
    /// are deterministic and independent of the thread count.
    func columnGroups(rows: Int, cols: Int, _ body: (_ c0: Int, _ width: Int) -> Void) {
        let groups = (cols + 15) / 16
        parallelFor(groups, work: rows * cols) { gr in
            let c0 = gr.lowerBound * 16, c1 = min(cols, gr.upperBound * 16)
            body(c0, c1 - c0)
        }
    }
    // MARK: Row reductions in eight lanes

    // Float sums are not reassociated by the compiler, so a plain loop runs one
    // add at a time. These keep eight partial sums (SIMD8) and add them in a
    // fixed order at the end: vectorised and still deterministic.

    @inline(__always)
    static func load8(_ p: UnsafePointer<Float>, _ i: Int) -> SIMD8<Float> {
        UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<Float>.self)
    }

    /// `sum_j f(j)` over `0..<n`, where `f8` gives eight consecutive terms at once
    /// and `f1` one term (for the tail).
    @inline(__always)
    static func laneSum(_ n: Int, _ f8: (Int) -> SIMD8<Float>, _ f1: (Int) -> Float) -> Float {
        var acc = SIMD8<Float>(repeating: 0)
        var j = 0
        while j + 8 <= n { acc += f8(j); j += 8 }
        var s = acc.sum()
        while j < n { s += f1(j); j += 1 }
        return s
    }

    // Lane-wise min and max as compare-and-select: the same values as the standard
    // library's pointwiseMin/pointwiseMax (Swift.min/max per lane: `y < x ? y : x`,
    // `y >= x ? y : x`, so a NaN in x stays), which the optimiser left as
    // out-of-line per-lane calls in these loops (5% of a training step).
    @inline(__always)
    static func min8(_ x: SIMD8<Float>, _ y: SIMD8<Float>) -> SIMD8<Float> { x.replacing(with: y, where: y .< x) }

    @inline(__always)
    static func max8(_ x: SIMD8<Float>, _ y: SIMD8<Float>) -> SIMD8<Float> { x.replacing(with: y, where: y .>= x) }

    @inline(__always)
    static func store8(_ p: UnsafeMutablePointer<Float>, _ i: Int, _ v: SIMD8<Float>) {
        UnsafeMutableRawPointer(p + i).storeBytes(of: v, as: SIMD8<Float>.self)
    }

    /// `exp` on eight lanes (Cephes expf: n = round(x / ln 2), r = x - n ln 2 with
    /// ln 2 in two parts, a degree-5 polynomial, times 2^n from exponent bits);
    /// within 2 ulp of libm over [-87, 88], saturating outside, NaN in gives NaN.
    /// libm's expf is scalar, and exp dominates softmax, cross-entropy and the
    /// sigmoid-based activations.
    @inline(__always)
    static func exp8(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let xc = min8(max8(x, SIMD8(repeating: -87.0)), SIMD8(repeating: 88.0))
        // Adding 1.5 * 2^23 rounds x / ln 2 to the nearest integer n and leaves n in
        // the low mantissa bits (no float-to-int conversion, which would trap on NaN).
        let magic = SIMD8<Float>(repeating: 12582912)
        let shifted = xc * 1.44269504088896341 + magic
        let n = shifted - magic
        let r = (xc - n * 0.693359375) - n * -2.12194440e-4
        var p = SIMD8<Float>(repeating: 1.9875691500e-4)
        p = p * r + 1.3981999507e-3
        p = p * r + 8.3334519073e-3
        p = p * r + 4.1665795894e-2
        p = p * r + 1.6666665459e-1
        p = p * r + 5.0000001201e-1
        let e = p * (r * r) + r + 1
        // 2^n from the exponent bits.
        let nBits = unsafeBitCast(shifted, to: SIMD8<UInt32>.self) &- unsafeBitCast(magic, to: SIMD8<UInt32>.self)
        let scale = unsafeBitCast((nBits &+ 127) &<< 23, to: SIMD8<Float>.self)
        return e * scale
    }

    // MARK: Normalisation

    private func normForward(_ x: Tensor, gamma: Tensor, beta: Tensor?, eps: Float, y: Tensor,
                             mean: Tensor?, rstd: Tensor) throws {
        let op = beta == nil ? "rmsNorm" : "layerNorm"
        try NNCheck.f32(op, x, gamma, y, rstd)
        let f = gamma.count
        let rows = try NNCheck.rows(op, x, features: f)
        try NNCheck.count(op, y, x.count, "y")
        try NNCheck.count(op, rstd, rows, "rstd")
        if let beta { try NNCheck.f32(op, beta); try NNCheck.count(op, beta, f, "beta") }
        if let mean { try NNCheck.f32(op, mean); try NNCheck.count(op, mean, rows, "mean") }
        let px = try f32(x), pg = try f32(gamma), pb = try beta.map(f32), py = try f32(y)
        let pm = try mean.map(f32), pr = try f32(rstd)
        // Per row: mean, then the variance of (x - mean) (two passes), in C.
        parallelFor(rows, work: x.count) { range in
            let r0 = range.lowerBound
            ck_norm_forward(px + r0 * f, pg, pb, eps, py + r0 * f, pm.map { $0 + r0 }, pr + r0, range.count, f)
        }
    }

    private func normBackward(dY: Tensor, x: Tensor, gamma: Tensor, mean: Tensor?, rstd: Tensor,
                              dX: Tensor, dGamma: Tensor, dBeta: Tensor?, accumulate: Bool) throws {
        let op = dBeta == nil ? "rmsNormBackward" : "layerNormBackward"
        try NNCheck.f32(op, dY, x, gamma, rstd, dX, dGamma)
        let f = gamma.count
        let rows = try NNCheck.rows(op, x, features: f)
        try NNCheck.count(op, dY, x.count, "dY")
        try NNCheck.count(op, dX, x.count, "dX")
        try NNCheck.count(op, rstd, rows, "rstd")
        try NNCheck.count(op, dGamma, f, "dGamma")
        if let dBeta { try NNCheck.f32(op, dBeta); try NNCheck.count(op, dBeta, f, "dBeta") }
        if let mean { try NNCheck.f32(op, mean); try NNCheck.count(op, mean, rows, "mean") }
        let pdy = try f32(dY), px = try f32(x), pg = try f32(gamma), pm = try mean.map(f32), pr = try f32(rstd)
        let pdx = try f32(dX), pdg = try f32(dGamma), pdb = try dBeta.map(f32)
        // LayerNorm (mean and dBeta given) or RMSNorm (neither): ck_norm_* take both or none.
        let centered = pdb != nil && pm != nil
        let pmean = centered ? pm : nil, pdbeta = centered ? pdb : nil
        let acc: Int32 = accumulate ? 1 : 0
        // dX = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dY * gamma (no mean(g) term for RMSNorm).
        parallelFor(rows, work: x.count) { range in
            let r0 = range.lowerBound
            ck_norm_backward_rows(pdy + r0 * f, px + r0 * f, pg, pmean.map { UnsafePointer($0 + r0) }, pr + r0,
                                  pdx + r0 * f, range.count, f, acc)
        }
        // dGamma = sum_r dY * xhat, dBeta = sum_r dY: fixed-order column sums.
        columnGroups(rows: rows, cols: f) { c0, width in
            ck_norm_param_grads(pdy + c0, px + c0, pmean, pr, rows, f, width, pdg + c0, pdbeta.map { $0 + c0 }, acc)
        }
    }

    public func layerNorm(_ x: Tensor, gamma: Tensor, beta: Tensor, eps: Float,
                          out y: Tensor, mean: Tensor, rstd: Tensor) throws {
        try normForward(x, gamma: gamma, beta: beta, eps: eps, y: y, mean: mean, rstd: rstd)
    }

    public func layerNormBackward(dY: Tensor, x: Tensor, gamma: Tensor, mean: Tensor, rstd: Tensor,
                                  dX: Tensor, dGamma: Tensor, dBeta: Tensor, accumulate: Bool) throws {
        try normBackward(dY: dY, x: x, gamma: gamma, mean: mean, rstd: rstd, dX: dX, dGamma: dGamma, dBeta: dBeta,
                         accumulate: accumulate)
    }

    public func rmsNorm(_ x: Tensor, gamma: Tensor, eps: Float, out y: Tensor, rstd: Tensor) throws {
        try normForward(x, gamma: gamma, beta: nil, eps: eps, y: y, mean: nil, rstd: rstd)
    }

    public func rmsNormBackward(dY: Tensor, x: Tensor, gamma: Tensor, rstd: Tensor,
                                dX: Tensor, dGamma: Tensor, accumulate: Bool) throws {
        try normBackward(dY: dY, x: x, gamma: gamma, mean: nil, rstd: rstd, dX: dX, dGamma: dGamma, dBeta: nil,
                         accumulate: accumulate)
    }

    // MARK: Broadcasts and reductions

    public func addBroadcast(_ b: Tensor, to y: Tensor) throws {
        try NNCheck.f32("addBroadcast", b, y)
        let period = b.count
        let rows = try NNCheck.rows("addBroadcast", y, features: period)
        let pb = try f32(b), py = try f32(y)
        parallelFor(rows, work: y.count) { range in
            for r in range {
                let yr = py + r * period
                for j in 0..<period { yr[j] += pb[j] }
            }
        }
    }

    public func sumRows(_ x: Tensor, into out: Tensor, accumulate: Bool) throws {
        try NNCheck.f32("sumRows", x, out)
        let cols = out.count
        guard cols > 0 else { return }
        let rows = try NNCheck.rows("sumRows", x, features: cols)
        let px = try f32(x), po = try f32(out)
        columnGroups(rows: rows, cols: cols) { c0, width in
            ck_sum_rows(px + c0, rows, cols, width, po + c0, accumulate ? 1 : 0)
        }
    }

    // MARK: Activations

    // The activation loops are C (CKernels/elementwise.c: erf GELU through the
    // XLA/Eigen rational erf, exact +-1 beyond |a| > 3.9; tanh GELU and SiLU through
    // a Cephes exp), vectorised for AVX-512 / AVX2 by run-time dispatch; so is SwiGLU.

    @inline(__always)
    static func load8(_ p: UnsafePointer<Float>, _ i: Int, count n: Int) -> SIMD8<Float> {
        if n == 8 { return load8(p, i) }
        var v = SIMD8<Float>(repeating: 0)
        for k in 0..<n { v[k] = p[i + k] }
        return v
    }

    @inline(__always)
    static func store8(_ p: UnsafeMutablePointer<Float>, _ i: Int, _ v: SIMD8<Float>, count n: Int) {
        if n == 8 { store8(p, i, v); return }
        for k in 0..<n { p[i + k] = v[k] }
    }

    /// The CKernels code of an activation function (CK_GELU_ERF, ...).
    static func kernelCode(_ f: ActivationFunction) -> Int32 {
        switch f {
        case .geluErf: return Int32(CK_GELU_ERF)
        case .geluTanh: return Int32(CK_GELU_TANH)
        case .silu: return Int32(CK_SILU)
        }
    }

    public func activation(_ f: ActivationFunction, _ x: Tensor, out y: Tensor) throws {
        try ElementwiseCheck.same("activation", x, y)
        let px = try f32(x), py = try f32(y)
        let code = Self.kernelCode(f)
        parallelFor(x.count, work: x.count * 8) { range in
            ck_activation(code, px + range.lowerBound, py + range.lowerBound, range.count)
        }
    }

    public func activationBackward(_ f: ActivationFunction, dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws {
        try ElementwiseCheck.same("activationBackward", dY, x, dX)
        let pdy = try f32(dY), px = try f32(x), pdx = try f32(dX)
        let code = Self.kernelCode(f), acc: Int32 = accumulate ? 1 : 0
        parallelFor(x.count, work: x.count * 8) { range in
            let i = range.lowerBound
            ck_activation_backward(code, pdy + i, px + i, pdx + i, range.count, acc)
        }
    }

    public func swiGLU(_ x: Tensor, out y: Tensor) throws {
        let h = try NNCheck.swiGLU(x: x, y: y)
        let px = try f32(x), py = try f32(y)
        parallelFor(y.count / h, work: y.count * 8) { range in
            ck_swiglu(px + range.lowerBound * 2 * h, py + range.lowerBound * h, range.count, h)
        }
    }

    public func swiGLUBackward(dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws {
        let h = try NNCheck.swiGLU(x: x, y: dY)
        try NNCheck.f32("swiGLUBackward", dX)
        try NNCheck.count("swiGLUBackward", dX, x.count, "dX")
        let pdy = try f32(dY), px = try f32(x), pdx = try f32(dX)
        let acc: Int32 = accumulate ? 1 : 0
        parallelFor(dY.count / h, work: dY.count * 8) { range in
            ck_swiglu_backward(pdy + range.lowerBound * h, px + range.lowerBound * 2 * h, pdx + range.lowerBound * 2 * h,
                               range.count, h, acc)
        }
    }

    // MARK: Softmax and layout

    public func softmax(_ x: Tensor, out y: Tensor, scale: Float, causal: Bool) throws {
        let (rows, f) = try NNCheck.softmax(x, y, causal: causal)
        let px = try f32(x), py = try f32(y)
        parallelFor(rows, work: x.count * 4) { range in
            let r0 = range.lowerBound
            ck_softmax_rows(px + r0 * f, py + r0 * f, range.count, f, scale, causal ? 1 : 0, r0)
        }
    }

    public func softmaxBackward(dY: Tensor, y: Tensor, dX: Tensor, scale: Float, accumulate: Bool) throws {
        let (rows, f) = try NNCheck.softmax(y, dY, causal: false)
        try NNCheck.f32("softmaxBackward", dX)
        try NNCheck.count("softmaxBackward", dX, y.count, "dX")
        let pdy = try f32(dY), py = try f32(y), pdx = try f32(dX)
        parallelFor(rows, work: y.count) { range in
            let o = range.lowerBound * f
            ck_softmax_backward_rows(pdy + o, py + o, pdx + o, range.count, f, scale, accumulate ? 1 : 0)
        }
    }

    public func transposeAxes(_ x: Tensor, permutation: [Int], out: Tensor) throws {
        let (dims, strides) = try NNCheck.permutation(x, permutation, out)
        let src = try raw(x).assumingMemoryBound(to: UInt32.self), dst = try raw(out).assumingMemoryBound(to: UInt32.self)
        let n = x.count
        guard n > 0 else { return }
        // Copy whole innermost rows when the last axis stays last (the attention
        // case), element by element otherwise.
        let inner = dims.last!, innerStride = strides.last!
        let outer = n / inner
        let rank = dims.count
        parallelFor(outer, work: n) { range in
            var coord = [Int](repeating: 0, count: rank)
            for o in range {
                var rem = o, base = 0
                for a in stride(from: rank - 2, through: 0, by: -1) {
                    coord[a] = rem % dims[a]; rem /= dims[a]
                    base += coord[a] * strides[a]
                }
                let d = dst + o * inner
                if innerStride == 1 {
                    (d).update(from: src + base, count: inner)
                } else {
                    for k in 0..<inner { d[k] = src[base + k * innerStride] }
                }
            }
        }
    }

    // MARK: Embedding

    public func embedding(table: Tensor, ids: Tensor, out: Tensor) throws {
        let (v, d, rows) = try NNCheck.embedding("embedding", table: table, ids: ids, rowsTensor: out, "out")
        guard rows > 0 else { return }
        let pt = try f32(table), pi = try i32(ids), po = try f32(out)
        parallelFor(rows, work: rows * d) { range in
            let r0 = range.lowerBound
            ck_embedding_rows(pt, v, d, pi + r0, range.count, po + r0 * d)
        }
    }

    public func embeddingBackward(dOut: Tensor, ids: Tensor, dTable: Tensor) throws {
        let (v, d, rows) = try NNCheck.embedding("embeddingBackward", table: dTable, ids: ids, rowsTensor: dOut, "dOut")
        guard rows > 0 else { return }
        let pg = try f32(dOut), pi = try i32(ids), pt = try f32(dTable)
        // Split by columns, never by rows: each table element is summed by one
        // thread in ascending row order, so repeated ids give the same bits.
        columnGroups(rows: rows, cols: d) { c0, width in
            ck_embedding_backward_columns(pg, pi, rows, v, d, c0, width, pt)
        }
    }

    // MARK: Loss and evaluation

    public func crossEntropy(logits: Tensor, labels: Tensor, labelSmoothing: Float,
                             rowLoss: Tensor, meanLoss: Tensor, dLogits: Tensor?, gradientScale: Float) throws {
        let (rows, c) = try NNCheck.crossEntropy(logits, labels, rowLoss, meanLoss, dLogits)
        let pz = try f32(logits), pl = try i32(labels), ploss = try f32(rowLoss), pd = try dLogits.map(f32)
        // Negative labels are ignored rows: the mean and the gradient are over the others.
        var targets = 0
        for r in 0..<rows where pl[r] >= 0 { targets += 1 }
        let s = labelSmoothing, gscale = gradientScale / Float(max(targets, 1))
        // loss = lse - (1 - s) z_label - (s / C) sum z; dLogits = gscale (softmax - (1 - s) onehot - s / C).
        parallelFor(rows, work: logits.count * 4) { range in
            let r0 = range.lowerBound
            ck_cross_entropy_rows(pz + r0 * c, pl + r0, s, ploss + r0, pd.map { $0 + r0 * c }, gscale, range.count, c)
        }
        var total: Double = 0
        for r in 0..<rows { total += Double(ploss[r]) }
        try f32(meanLoss)[0] = targets > 0 ? Float(total / Double(targets)) : 0
    }

    public func argmaxRows(_ x: Tensor, out: Tensor) throws {
        let (rows, f) = try NNCheck.argmax(x, out)
        let px = try f32(x), po = try i32(out)
        for r in 0..<rows {
            let xr = px + r * f
            var best = 0
            for j in 1..<max(f, 1) where xr[j] > xr[best] { best = j }
            po[r] = Int32(best)
        }
    }

    // MARK: Regularisation and pooling

    public func dropout(_ x: Tensor, p: Float, seed: UInt64, out y: Tensor, accumulate: Bool) throws {
        try ElementwiseCheck.same("dropout", x, y)
        try require(p >= 0 && !p.isNaN, "dropout probability must be >= 0, got \(p)")
        let px = try f32(x), py = try f32(y)
        let threshold = NNCheck.dropoutThreshold(p), scale: Float = p < 1 ? 1 / (1 - p) : 0, dropAll = p >= 1
        parallelFor(x.count, work: x.count * 4) { range in
            for i in range {
                let keep = !dropAll && Reference.dropoutHash(seed: seed, index: UInt32(truncatingIfNeeded: i)) >= threshold
                Self.store(py, i, keep ? px[i] * scale : 0, accumulate)
            }
        }
    }

    public func addGaussianNoise(_ x: Tensor, std: Float, seed: UInt64) throws {
        try ElementwiseCheck.same("addGaussianNoise", x)
        let px = try f32(x)
        parallelFor(x.count, work: x.count * 16) { range in
            for i in range {
                let a = Reference.dropoutHash(seed: seed, index: UInt32(truncatingIfNeeded: 2 * i))
                let b = Reference.dropoutHash(seed: seed, index: UInt32(truncatingIfNeeded: 2 * i + 1))
                let u1 = (Float(a >> 8) + 1) * (1 / 16_777_216), u2 = Float(b >> 8) * (1 / 16_777_216)
                px[i] += std * (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * Float.pi * u2)
            }
        }
    }

    public func scaleRows(_ x: Tensor, by m: Tensor, out y: Tensor, accumulate: Bool) throws {
        try ElementwiseCheck.same("scaleRows", x, y)
        let f = try NNCheck.scaleRows(x, m)
        guard x.count > 0 else { return }
        let px = try f32(x), pm = try f32(m), py = try f32(y)
        parallelFor(m.count, work: x.count) { range in
            for r in range {
                let s = pm[r], xr = px + r * f, yr = py + r * f
                if accumulate { for j in 0..<f { yr[j] += xr[j] * s } } else { for j in 0..<f { yr[j] = xr[j] * s } }
            }
        }
    }

    public func meanPool(_ x: Tensor, tokens: Range<Int>, out y: Tensor) throws {
        let (b, t, h) = try NNCheck.pool(x, tokens, y)
        let px = try f32(x), py = try f32(y)
        let inv = 1 / Float(tokens.count)
        parallelFor(b, work: b * tokens.count * h) { range in
            for bi in range {
                let yr = py + bi * h
                for j in 0..<h { yr[j] = 0 }
                for k in tokens {
                    let xr = px + (bi * t + k) * h
                    for j in 0..<h { yr[j] += xr[j] }
                }
                for j in 0..<h { yr[j] *= inv }
            }
        }
    }

    public func meanPoolBackward(dY: Tensor, tokens: Range<Int>, dX: Tensor, accumulate: Bool) throws {
        let (b, t, h) = try NNCheck.pool(dX, tokens, dY)
        let pdy = try f32(dY), pdx = try f32(dX)
        let n = Float(tokens.count)
        parallelFor(b, work: b * t * h) { range in
            for bi in range {
                for k in 0..<t {
                    let dxr = pdx + (bi * t + k) * h, dyr = pdy + bi * h
                    if tokens.contains(k) {
                        for j in 0..<h { Self.store(dxr, j, dyr[j] / n, accumulate) }
                    } else if !accumulate {
                        for j in 0..<h { dxr[j] = 0 }
                    }
                }
            }
        }
    }
}
