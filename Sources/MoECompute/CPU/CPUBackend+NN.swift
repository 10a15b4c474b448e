import Foundation

/// `NNOps` on the host: plain loops over contiguous rows (auto-vectorised in
/// release builds), split over the cores by rows when the work is large.
/// Reductions over rows are split by columns instead, so every column is summed
/// in row order whatever the thread count: deterministic.
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
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            body((t * count / threads)..<((t + 1) * count / threads))
        }
    }

    @inline(__always)
    static func store(_ p: UnsafeMutablePointer<Float>, _ i: Int, _ v: Float, _ accumulate: Bool) {
        if accumulate { p[i] += v } else { p[i] = v }
    }

    /// `out[j] (+)= sum_r term(r, j)` for columns `cols`, in row order per column;
    /// rows are added in blocks of 64 into a partial row first (as the OpenCL
    /// kernels do), which keeps the float error small for many rows. `addRow`
    /// adds row r's terms for a range of columns into the partial row.
    @inline(__always)
    func columnSums(rows: Int, cols: Int, out: UnsafeMutablePointer<Float>, accumulate: Bool,
                           _ addRow: (Int, Range<Int>, UnsafeMutablePointer<Float>) -> Void) {
        columnSums(rows: rows, cols: cols, out: out, out2: nil, accumulate: accumulate) { r, cr, part, _ in addRow(r, cr, part) }
    }

    /// Two column sums in one pass over the rows (`out2` gets the second partial row).
    func columnSums(rows: Int, cols: Int, out: UnsafeMutablePointer<Float>, out2: UnsafeMutablePointer<Float>?,
                           accumulate: Bool,
                           _ addRow: (Int, Range<Int>, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>) -> Void) {
        parallelFor(cols, work: rows * cols) { cr in
            let width = cr.count
            let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 4 * width)
            defer { buffer.deallocate() }
            let total = buffer, part = buffer + width, total2 = buffer + 2 * width, part2 = buffer + 3 * width
            total.initialize(repeating: 0, count: width)
            total2.initialize(repeating: 0, count: width)
            var r0 = 0
            while r0 < rows {
                part.initialize(repeating: 0, count: width)
                part2.initialize(repeating: 0, count: width)
                for r in r0..<min(rows, r0 + 64) { addRow(r, cr, part, part2) }
                for k in 0..<width { total[k] += part[k]; total2[k] += part2[k] }
                r0 += 64
            }
            for k in 0..<width { Self.store(out, cr.lowerBound + k, total[k], accumulate) }
            if let out2 { for k in 0..<width { Self.store(out2, cr.lowerBound + k, total2[k], accumulate) } }
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

    /// `max_j scale * p[j]` over `0..<n` (-inf for n = 0), eight lanes at a time.
    @inline(__always)
    static func scaledMax(_ p: UnsafePointer<Float>, _ n: Int, scale: Float) -> Float {
        var m8 = SIMD8<Float>(repeating: -.infinity)
        var j = 0
        while j + 8 <= n { m8 = max8(m8, scale * load8(p, j)); j += 8 }
        var m = m8.max()
        while j < n { m = max(m, scale * p[j]); j += 1 }
        return m
    }

    /// Runs `f8` on each full group of eight indices of `range` and `f1` on the rest.
    @inline(__always)
    static func forEight(_ range: Range<Int>, _ f8: (Int) -> Void, _ f1: (Int) -> Void) {
        var i = range.lowerBound
        while i + 8 <= range.upperBound { f8(i); i += 8 }
        while i < range.upperBound { f1(i); i += 1 }
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
        parallelFor(rows, work: x.count) { range in
            for r in range {
                let xr = px + r * f, yr = py + r * f
                var mu: Float = 0
                if pb != nil {
                    mu = Self.laneSum(f, { Self.load8(xr, $0) }, { xr[$0] }) / Float(f)
                }
                // Two passes: the variance of (x - mean), not E[x^2] - mean^2.
                let mu8 = SIMD8<Float>(repeating: mu)
                let ss = Self.laneSum(f, { let d = Self.load8(xr, $0) - mu8; return d * d },
                                      { let d = xr[$0] - mu; return d * d })
                let rs = 1 / (ss / Float(f) + eps).squareRoot()
                if let pb {
                    for j in 0..<f { yr[j] = (xr[j] - mu) * rs * pg[j] + pb[j] }
                } else {
                    for j in 0..<f { yr[j] = xr[j] * rs * pg[j] }
                }
                pm?[r] = mu
                pr[r] = rs
            }
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
        let centered = dBeta != nil
        // dX = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dY * gamma (no mean(g) term for RMSNorm).
        parallelFor(rows, work: x.count) { range in
            for r in range {
                let dyr = pdy + r * f, xr = px + r * f, dxr = pdx + r * f
                let mu = pm?[r] ?? 0, rs = pr[r]
                let mu8 = SIMD8<Float>(repeating: mu)
                let sg = centered ? Self.laneSum(f, { Self.load8(dyr, $0) * Self.load8(pg, $0) }, { dyr[$0] * pg[$0] }) : 0
                let sgx = Self.laneSum(f, { Self.load8(dyr, $0) * Self.load8(pg, $0) * (Self.load8(xr, $0) - mu8) },
                                       { dyr[$0] * pg[$0] * (xr[$0] - mu) }) * rs
                let meanG = centered ? sg / Float(f) : 0, meanGX = sgx / Float(f)
                for j in 0..<f {
                    let v = rs * (dyr[j] * pg[j] - meanG - (xr[j] - mu) * rs * meanGX)
                    if accumulate { dxr[j] += v } else { dxr[j] = v }
                }
            }
        }
        // dGamma = sum_r dY * xhat, dBeta = sum_r dY.
        if let pdb {
            columnSums(rows: rows, cols: f, out: pdg, out2: pdb, accumulate: accumulate) { r, cols, part, part2 in
                let mu = pm?[r] ?? 0, rs = pr[r], base = r * f + cols.lowerBound
                for k in 0..<cols.count {
                    let d = pdy[base + k]
                    part[k] += d * (px[base + k] - mu) * rs
                    part2[k] += d
                }
            }
        } else {
            columnSums(rows: rows, cols: f, out: pdg, accumulate: accumulate) { r, cols, part in
                let rs = pr[r], base = r * f + cols.lowerBound
                for k in 0..<cols.count { part[k] += pdy[base + k] * px[base + k] * rs }
            }
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
        columnSums(rows: rows, cols: cols, out: po, accumulate: accumulate) { r, cr, part in
            let base = r * cols + cr.lowerBound
            for k in 0..<cr.count { part[k] += px[base + k] }
        }
    }

    // MARK: Activations

    @inline(__always)
    static func sigmoid(_ x: Float) -> Float { 1 / (1 + Foundation.exp(-x)) }

    /// tanh through one exp (several times faster than libm's tanhf on this
    /// path): exact limits +-1, absolute error a few ulp.
    @inline(__always)
    static func tanhViaExp(_ u: Float) -> Float { 1 - 2 / (1 + Foundation.exp(2 * u)) }

    // tanh GELU: 0.5 x (1 + tanh(k (x + c x^3))), k = sqrt(2/pi), c = 0.044715
    @inline(__always)
    static func geluTanh(_ x: Float) -> Float { 0.5 * x * (1 + tanhViaExp(0.79788456080286536 * (x + 0.044715 * x * x * x))) }

    @inline(__always)
    static func geluTanhGrad(_ x: Float) -> Float {
        let k: Float = 0.79788456080286536, c: Float = 0.044715
        let t = tanhViaExp(k * (x + c * x * x * x))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * c * x * x)
    }

    @inline(__always)
    static func silu(_ x: Float) -> Float { x * sigmoid(x) }

    // Eight-lane versions of the exp-based activations (same formulas).
    @inline(__always)
    static func sigmoid8(_ x: SIMD8<Float>) -> SIMD8<Float> { 1 / (1 + exp8(-x)) }

    @inline(__always)
    static func tanh8(_ u: SIMD8<Float>) -> SIMD8<Float> { 1 - 2 / (1 + exp8(2 * u)) }

    @inline(__always)
    static func geluTanh8(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let u: SIMD8<Float> = 0.79788456080286536 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1 + tanh8(u))
    }

    @inline(__always)
    static func geluTanhGrad8(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let k: Float = 0.79788456080286536, c: Float = 0.044715
        let x2: SIMD8<Float> = x * x
        let t: SIMD8<Float> = tanh8(k * (x + c * x2 * x))
        let outer: SIMD8<Float> = 0.5 * (1 + t)
        let inner: SIMD8<Float> = (0.5 * k) * x * (1 - t * t) * (1 + (3 * c) * x2)
        return outer + inner
    }

    /// `erf` on eight lanes: the odd/even rational approximation of XLA's and
    /// Eigen's float erf (numerator degree 13, denominator degree 8) on [-3.9, 3.9],
    /// exactly +-1 beyond (where float erf rounds to +-1 anyway; the rational's
    /// value there, inf or NaN for huge inputs, is replaced, so no input clamp).
    /// Max absolute error 4e-7 against float64 erf (erff: 5e-8), relative error
    /// below 4e-7 everywhere; NaN in gives NaN. libm's erff is scalar and was the
    /// largest single cost of the erf-GELU MLPs.
    @inline(__always)
    static func erf8(_ a: SIMD8<Float>) -> SIMD8<Float> {
        let x2 = a * a
        var p = SIMD8<Float>(repeating: -2.72614225801306e-10)
        p = p * x2 + 2.77068142495902e-08
        p = p * x2 + -2.10102402082508e-06
        p = p * x2 + -5.69250639462346e-05
        p = p * x2 + -7.34990630326855e-04
        p = p * x2 + -2.95459980854025e-03
        p = p * x2 + -1.60960333262415e-02
        var q = SIMD8<Float>(repeating: -1.45660718464996e-05)
        q = q * x2 + -2.13374055278905e-04
        q = q * x2 + -1.68282697438203e-03
        q = q * x2 + -7.37332916720468e-03
        q = q * x2 + -1.42647390514189e-02
        let y = (p * a) / q
        // Saturate exactly; a NaN in a stays NaN through y (both compares false).
        let one = SIMD8<Float>(repeating: 1)
        return y.replacing(with: one, where: a .> 3.9).replacing(with: -one, where: a .< -3.9)
    }

    @inline(__always)
    static func geluErf8(_ x: SIMD8<Float>) -> SIMD8<Float> { 0.5 * x * (1 + erf8(x * 0.70710678118654752)) }

    @inline(__always)
    static func geluErfGrad8(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let cdf: SIMD8<Float> = 0.5 * (1 + erf8(x * 0.70710678118654752))
        return cdf + x * 0.39894228040143268 * exp8(-0.5 * x * x)
    }

    /// Applies `f8` to every element of `range`, the tail (fewer than eight) through
    /// a zero-padded lane group, so each element gets the same formula wherever the
    /// thread split puts it. `f8(i, n)` handles `n` (<= 8) elements from `i`.
    @inline(__always)
    static func forEightPadded(_ range: Range<Int>, _ f8: (Int, Int) -> Void) {
        var i = range.lowerBound
        while i + 8 <= range.upperBound { f8(i, 8); i += 8 }
        if i < range.upperBound { f8(i, range.upperBound - i) }
    }

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

    @inline(__always)
    static func silu8(_ x: SIMD8<Float>) -> SIMD8<Float> { x * sigmoid8(x) }

    @inline(__always)
    static func siluGrad8(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let s = sigmoid8(x)
        return s * (1 + x * (1 - s))
    }

    @inline(__always)
    static func siluGrad(_ x: Float) -> Float {
        let s = sigmoid(x)
        return s * (1 + x * (1 - s))
    }

    public func activation(_ f: ActivationFunction, _ x: Tensor, out y: Tensor) throws {
        try ElementwiseCheck.same("activation", x, y)
        let px = try f32(x), py = try f32(y)
        // One loop per function, so each inlines into a tight loop.
        parallelFor(x.count, work: x.count * 8) { range in
            switch f {
            case .geluErf:
                Self.forEightPadded(range) { i, n in Self.store8(py, i, Self.geluErf8(Self.load8(px, i, count: n)), count: n) }
            case .geluTanh:
                Self.forEight(range, { Self.store8(py, $0, Self.geluTanh8(Self.load8(px, $0))) }, { py[$0] = Self.geluTanh(px[$0]) })
            case .silu:
                Self.forEight(range, { Self.store8(py, $0, Self.silu8(Self.load8(px, $0))) }, { py[$0] = Self.silu(px[$0]) })
            }
        }
    }

    public func activationBackward(_ f: ActivationFunction, dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws {
        try ElementwiseCheck.same("activationBackward", dY, x, dX)
        let pdy = try f32(dY), px = try f32(x), pdx = try f32(dX)
        parallelFor(x.count, work: x.count * 8) { range in
            switch f {
            case .geluErf:
                Self.forEightPadded(range) { i, n in
                    let v = Self.load8(pdy, i, count: n) * Self.geluErfGrad8(Self.load8(px, i, count: n))
                    Self.store8(pdx, i, accumulate ? Self.load8(pdx, i, count: n) + v : v, count: n)
                }
            case .geluTanh:
                Self.forEight(range, { i in
                    let v = Self.load8(pdy, i) * Self.geluTanhGrad8(Self.load8(px, i))
                    Self.store8(pdx, i, accumulate ? Self.load8(pdx, i) + v : v)
                }, { Self.store(pdx, $0, pdy[$0] * Self.geluTanhGrad(px[$0]), accumulate) })
            case .silu:
                Self.forEight(range, { i in
                    let v = Self.load8(pdy, i) * Self.siluGrad8(Self.load8(px, i))
                    Self.store8(pdx, i, accumulate ? Self.load8(pdx, i) + v : v)
                }, { Self.store(pdx, $0, pdy[$0] * Self.siluGrad(px[$0]), accumulate) })
            }
        }
    }

    public func swiGLU(_ x: Tensor, out y: Tensor) throws {
        let h = try NNCheck.swiGLU(x: x, y: y)
        let px = try f32(x), py = try f32(y)
        parallelFor(y.count / h, work: y.count * 8) { range in
            for r in range {
                let a = px + r * 2 * h, b = a + h, yr = py + r * h
                for i in 0..<h { yr[i] = Self.silu(a[i]) * b[i] }
            }
        }
    }

    public func swiGLUBackward(dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws {
        let h = try NNCheck.swiGLU(x: x, y: dY)
        try NNCheck.f32("swiGLUBackward", dX)
        try NNCheck.count("swiGLUBackward", dX, x.count, "dX")
        let pdy = try f32(dY), px = try f32(x), pdx = try f32(dX)
        parallelFor(dY.count / h, work: dY.count * 8) { range in
            for r in range {
                let a = px + r * 2 * h, b = a + h, g = pdy + r * h
                let da = pdx + r * 2 * h, db = da + h
                for i in 0..<h {
                    // da = dY * b * silu'(a), db = dY * silu(a)
                    let vA = g[i] * b[i] * Self.siluGrad(a[i]), vB = g[i] * Self.silu(a[i])
                    if accumulate { da[i] += vA; db[i] += vB } else { da[i] = vA; db[i] = vB }
                }
            }
        }
    }

    // MARK: Softmax and layout

    public func softmax(_ x: Tensor, out y: Tensor, scale: Float, causal: Bool) throws {
        let (rows, f) = try NNCheck.softmax(x, y, causal: causal)
        let px = try f32(x), py = try f32(y)
        parallelFor(rows, work: x.count * 4) { range in
            for r in range {
                let xr = px + r * f, yr = py + r * f
                let visible = causal ? r % f + 1 : f
                let m = Self.scaledMax(xr, visible, scale: scale)
                // One exp per element, eight at a time: e parked in y, then scaled.
                let m8 = SIMD8<Float>(repeating: m)
                let s = Self.laneSum(visible, { j in
                    let e = Self.exp8(scale * Self.load8(xr, j) - m8); Self.store8(yr, j, e); return e
                }, { j in
                    let e = Foundation.exp(scale * xr[j] - m); yr[j] = e; return e
                })
                let inv = 1 / s
                for j in 0..<visible { yr[j] *= inv }
                for j in visible..<f { yr[j] = 0 }
            }
        }
    }

    public func softmaxBackward(dY: Tensor, y: Tensor, dX: Tensor, scale: Float, accumulate: Bool) throws {
        let (rows, f) = try NNCheck.softmax(y, dY, causal: false)
        try NNCheck.f32("softmaxBackward", dX)
        try NNCheck.count("softmaxBackward", dX, y.count, "dX")
        let pdy = try f32(dY), py = try f32(y), pdx = try f32(dX)
        parallelFor(rows, work: y.count) { range in
            for r in range {
                let dyr = pdy + r * f, yr = py + r * f, dxr = pdx + r * f
                let dot = Self.laneSum(f, { Self.load8(dyr, $0) * Self.load8(yr, $0) }, { dyr[$0] * yr[$0] })
                for j in 0..<f {
                    let v = scale * yr[j] * (dyr[j] - dot)
                    if accumulate { dxr[j] += v } else { dxr[j] = v }
                }
            }
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

    // MARK: Loss and evaluation

    public func crossEntropy(logits: Tensor, labels: Tensor, labelSmoothing: Float,
                             rowLoss: Tensor, meanLoss: Tensor, dLogits: Tensor?, gradientScale: Float) throws {
        let (rows, c) = try NNCheck.crossEntropy(logits, labels, rowLoss, meanLoss, dLogits)
        let pz = try f32(logits), pl = try i32(labels), ploss = try f32(rowLoss), pd = try dLogits.map(f32)
        let s = labelSmoothing, gscale = gradientScale / Float(max(rows, 1))
        parallelFor(rows, work: logits.count * 4) { range in
            for r in range {
                let zr = pz + r * c
                let label = Int(pl[r])
                let valid = label >= 0 && label < c
                let m = Self.scaledMax(zr, c, scale: 1)
                let sz = Self.laneSum(c, { Self.load8(zr, $0) }, { zr[$0] })
                let m8 = SIMD8<Float>(repeating: m)
                let se: Float
                if let pd {
                    // One exp per element, eight at a time: park exp(z - m) in dLogits.
                    let dr = pd + r * c
                    se = Self.laneSum(c, { j in let e = Self.exp8(Self.load8(zr, j) - m8); Self.store8(dr, j, e); return e },
                                      { j in let e = Foundation.exp(zr[j] - m); dr[j] = e; return e })
                } else {
                    se = Self.laneSum(c, { Self.exp8(Self.load8(zr, $0) - m8) }, { Foundation.exp(zr[$0] - m) })
                }
                let lse = m + Foundation.log(se)
                // loss = lse - (1 - s) z_label - (s / C) sum z
                ploss[r] = valid ? lse - (1 - s) * zr[label] - s / Float(c) * sz : .nan
                if let pd {
                    let dr = pd + r * c, inv = 1 / se, base = s / Float(c)
                    if valid {
                        for j in 0..<c { dr[j] = gscale * (dr[j] * inv - base) }
                        dr[label] -= gscale * (1 - s)
                    } else {
                        for j in 0..<c { dr[j] = .nan }
                    }
                }
            }
        }
        var total: Double = 0
        for r in 0..<rows { total += Double(ploss[r]) }
        try f32(meanLoss)[0] = rows > 0 ? Float(total / Double(rows)) : .nan
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
