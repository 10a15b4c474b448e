import MoECompute
import XCTest
import MoETestSupport

/// Float64 copies of float inputs.
func dbl(_ x: [Float]) -> [Double] { x.map(Double.init) }

/// Central differences of a scalar function of `x`, in float64.
func numericGradient(at x: [Double], h: Double = 1e-5, _ f: ([Double]) -> Double) -> [Double] {
    var xp = x
    return x.indices.map { i in
        xp[i] = x[i] + h; let up = f(xp)
        xp[i] = x[i] - h; let down = f(xp)
        xp[i] = x[i]
        return (up - down) / (2 * h)
    }
}

/// `sum_i w_i y_i`: the scalar whose gradient with respect to y is w.
func dot(_ w: [Double], _ y: [Double]) -> Double { zip(w, y).reduce(0) { $0 + $1.0 * $1.1 } }

/// Bounds, per op, on `||got - ref|| / ||ref||` for f32 results against the float64 reference.
enum Bound {
    /// Element-wise ops (activations, dropout, broadcasts, pooling, permutes).
    static let elementwise = 2e-6
    /// Row reductions (norms, softmax, cross-entropy) and their gradients.
    static let rows = 1e-5
    /// Finite differences against the analytic float64 gradient.
    static let finiteDifference = 1e-6
}

final class NNTests: XCTestCase {
    /// (rows, features) covering 1, non-powers of two and sizes past one work-group.
    let normShapes = [(1, 1), (3, 7), (130, 37), (3, 257), (2, 769), (1, 1000)]

    // MARK: LayerNorm and RMSNorm

    func testLayerNormForwardAndBackwardMatchReference() throws {
        for backend in try TestDevices.all() {
            for (rows, f) in normShapes {
                let seed = UInt64(rows * 10_000 + f)
                let xs = randomFloats(rows * f, seed: seed, in: -2...3), gs = randomFloats(f, seed: seed + 1, in: 0.5...1.5)
                let bs = randomFloats(f, seed: seed + 2), dys = randomFloats(rows * f, seed: seed + 3)
                let eps: Float = 1e-5
                let x = try backend.tensor(xs, shape: [rows, f]), gamma = try backend.tensor(gs, shape: [f])
                let beta = try backend.tensor(bs, shape: [f])
                let y = try backend.zeros([rows, f]), mean = try backend.zeros([rows]), rstd = try backend.zeros([rows])
                try backend.layerNorm(x, gamma: gamma, beta: beta, eps: eps, out: y, mean: mean, rstd: rstd)
                let ref = Reference.layerNorm(dbl(xs), gamma: dbl(gs), beta: dbl(bs), eps: Double(eps))
                let what = "layerNorm \(backend.name) \(rows)x\(f)"
                assertRelativeError(try y.floats(), ref.y, below: Bound.rows, what)
                assertRelativeError(try mean.floats(), ref.mean, below: Bound.rows, what + " mean")
                assertRelativeError(try rstd.floats(), ref.rstd, below: Bound.rows, what + " rstd")

                // Backward, overwriting outputs that hold NaN, then accumulating onto it.
                let dy = try backend.tensor(dys, shape: [rows, f])
                let dx = try backend.tensor([Float](repeating: .nan, count: rows * f), shape: [rows, f])
                let dg = try backend.tensor([Float](repeating: .nan, count: f), shape: [f])
                let db = try backend.tensor([Float](repeating: .nan, count: f), shape: [f])
                try backend.layerNormBackward(dY: dy, x: x, gamma: gamma, mean: mean, rstd: rstd,
                                              dX: dx, dGamma: dg, dBeta: db, accumulate: false)
                let rb = Reference.layerNormBackward(dbl(dys), x: dbl(xs), gamma: dbl(gs), eps: Double(eps))
                assertRelativeError(try dx.floats(), rb.dx, below: Bound.rows, what + " dX")
                assertRelativeError(try dg.floats(), rb.dGamma, below: Bound.rows, what + " dGamma")
                assertRelativeError(try db.floats(), rb.dBeta, below: Bound.rows, what + " dBeta")
                try backend.layerNormBackward(dY: dy, x: x, gamma: gamma, mean: mean, rstd: rstd,
                                              dX: dx, dGamma: dg, dBeta: db, accumulate: true)
                assertRelativeError(try dx.floats(), rb.dx.map { 2 * $0 }, below: Bound.rows, what + " dX accumulated")
                assertRelativeError(try dg.floats(), rb.dGamma.map { 2 * $0 }, below: Bound.rows, what + " dGamma accumulated")
                assertRelativeError(try db.floats(), rb.dBeta.map { 2 * $0 }, below: Bound.rows, what + " dBeta accumulated")
            }
        }
    }

    func testRMSNormForwardAndBackwardMatchReference() throws {
        for backend in try TestDevices.all() {
            for (rows, f) in normShapes {
                let seed = UInt64(rows * 10_000 + f) + 7
                let xs = randomFloats(rows * f, seed: seed, in: -2...3), gs = randomFloats(f, seed: seed + 1, in: 0.5...1.5)
                let dys = randomFloats(rows * f, seed: seed + 3)
                let eps: Float = 1e-6
                let x = try backend.tensor(xs, shape: [rows, f]), gamma = try backend.tensor(gs, shape: [f])
                let y = try backend.zeros([rows, f]), rstd = try backend.zeros([rows])
                try backend.rmsNorm(x, gamma: gamma, eps: eps, out: y, rstd: rstd)
                let ref = Reference.rmsNorm(dbl(xs), gamma: dbl(gs), eps: Double(eps))
                let what = "rmsNorm \(backend.name) \(rows)x\(f)"
                assertRelativeError(try y.floats(), ref.y, below: Bound.rows, what)
                assertRelativeError(try rstd.floats(), ref.rstd, below: Bound.rows, what + " rstd")

                let dy = try backend.tensor(dys, shape: [rows, f])
                let dx = try backend.zeros([rows, f]), dg = try backend.zeros([f])
                try backend.rmsNormBackward(dY: dy, x: x, gamma: gamma, rstd: rstd, dX: dx, dGamma: dg, accumulate: false)
                let rb = Reference.rmsNormBackward(dbl(dys), x: dbl(xs), gamma: dbl(gs), eps: Double(eps))
                if f == 1 {
                    // One feature: dX = rstd g (1 - xhat^2) with xhat^2 = x^2/(x^2 + eps) ~ 1, a
                    // cancellation no f32 formula avoids; bound the error by the size of rstd * g instead.
                    let scale = (0..<rows).map { Double(gs[0]) * Double(dys[$0]) * ref.rstd[$0] }
                    let got = try dx.floats()
                    let err = Reference.relativeError(zip(got, rb.dx).map { Double($0) - $1 }, [Double](repeating: 0, count: rows))
                        / Reference.relativeError(scale, [Double](repeating: 0, count: rows))
                    XCTAssertLessThan(err, Bound.rows, what + " dX relative to rstd * dY * gamma")
                } else {
                    assertRelativeError(try dx.floats(), rb.dx, below: Bound.rows, what + " dX")
                }
                assertRelativeError(try dg.floats(), rb.dGamma, below: Bound.rows, what + " dGamma")
            }
        }
    }

    func testNormReferenceGradientsMatchFiniteDifferences() {
        let (rows, f) = (3, 5)
        let x = dbl(randomFloats(rows * f, seed: 1, in: -2...2)), g = dbl(randomFloats(f, seed: 2, in: 0.5...1.5))
        let b = dbl(randomFloats(f, seed: 3)), w = dbl(randomFloats(rows * f, seed: 4))
        let eps = 1e-5
        let ln = Reference.layerNormBackward(w, x: x, gamma: g, eps: eps)
        assertClose(ln.dx, numericGradient(at: x) { dot(w, Reference.layerNorm($0, gamma: g, beta: b, eps: eps).y) }, "LN dX")
        assertClose(ln.dGamma, numericGradient(at: g) { dot(w, Reference.layerNorm(x, gamma: $0, beta: b, eps: eps).y) }, "LN dGamma")
        assertClose(ln.dBeta, numericGradient(at: b) { dot(w, Reference.layerNorm(x, gamma: g, beta: $0, eps: eps).y) }, "LN dBeta")
        let rms = Reference.rmsNormBackward(w, x: x, gamma: g, eps: eps)
        assertClose(rms.dx, numericGradient(at: x) { dot(w, Reference.rmsNorm($0, gamma: g, eps: eps).y) }, "RMS dX")
        assertClose(rms.dGamma, numericGradient(at: g) { dot(w, Reference.rmsNorm(x, gamma: $0, eps: eps).y) }, "RMS dGamma")
    }

    /// Same inputs twice give bit-identical parameter gradients (fixed-order reductions).
    func testNormParameterGradientsAreDeterministic() throws {
        for backend in try TestDevices.all() {
            let (rows, f) = (1000, 96)
            let x = try backend.tensor(randomFloats(rows * f, seed: 5), shape: [rows, f])
            let gamma = try backend.tensor(randomFloats(f, seed: 6), shape: [f]), beta = try backend.zeros([f])
            let y = try backend.zeros([rows, f]), mean = try backend.zeros([rows]), rstd = try backend.zeros([rows])
            try backend.layerNorm(x, gamma: gamma, beta: beta, eps: 1e-5, out: y, mean: mean, rstd: rstd)
            let dy = try backend.tensor(randomFloats(rows * f, seed: 7), shape: [rows, f])
            var results: [[Float]] = []
            for _ in 0..<2 {
                let dx = try backend.zeros([rows, f]), dg = try backend.zeros([f]), db = try backend.zeros([f])
                try backend.layerNormBackward(dY: dy, x: x, gamma: gamma, mean: mean, rstd: rstd,
                                              dX: dx, dGamma: dg, dBeta: db, accumulate: false)
                results.append(try dg.floats() + db.floats() + dx.floats())
            }
            XCTAssertEqual(results[0], results[1], backend.name)
        }
    }

    // MARK: Bias, broadcasts, column sums

    func testAddBroadcastAndSumRowsMatchReference() throws {
        for backend in try TestDevices.all() {
            for (rows, cols) in [(1, 1), (3, 7), (130, 37), (257, 3), (3, 769)] {
                let ys = randomFloats(rows * cols, seed: UInt64(rows + cols)), bs = randomFloats(cols, seed: 9)
                let y = try backend.tensor(ys, shape: [rows, cols]), b = try backend.tensor(bs, shape: [cols])
                try backend.addBroadcast(b, to: y)
                let what = "\(backend.name) \(rows)x\(cols)"
                assertRelativeError(try y.floats(), Reference.addBroadcast(dbl(bs), to: dbl(ys)), below: Bound.elementwise, "addBroadcast " + what)
                let s = try backend.tensor([Float](repeating: .nan, count: cols), shape: [cols])
                try backend.sumRows(y, into: s, accumulate: false)
                let ref = Reference.sumRows(dbl(try y.floats()), columns: cols)
                assertRelativeError(try s.floats(), ref, below: Bound.rows, "sumRows " + what)
                try backend.sumRows(y, into: s, accumulate: true)
                assertRelativeError(try s.floats(), ref.map { 2 * $0 }, below: Bound.rows, "sumRows accumulate " + what)
            }
            // Positional embedding: [T, H] added to every batch of [B, T, H]; its gradient is sumRows.
            let (bsz, t, h) = (3, 5, 4)
            let xs = randomFloats(bsz * t * h, seed: 11), ps = randomFloats(t * h, seed: 12)
            let x = try backend.tensor(xs, shape: [bsz, t, h]), pos = try backend.tensor(ps, shape: [t, h])
            try backend.addBroadcast(pos, to: x)
            assertRelativeError(try x.floats(), Reference.addBroadcast(dbl(ps), to: dbl(xs)), below: Bound.elementwise, "pos \(backend.name)")
            let dpos = try backend.zeros([t, h])
            try backend.sumRows(x, into: dpos, accumulate: false)
            assertRelativeError(try dpos.floats(), Reference.sumRows(dbl(try x.floats()), columns: t * h), below: Bound.rows,
                                "dpos \(backend.name)")
        }
    }

    // MARK: Activations

    func testActivationsMatchReference() throws {
        for backend in try TestDevices.all() {
            for f in ActivationFunction.allCases {
                for n in [1, 7, 1000, 4099] {
                    let xs = randomFloats(n, seed: UInt64(n) + 21, in: -6...6), dys = randomFloats(n, seed: UInt64(n) + 22)
                    let x = try backend.tensor(xs, shape: [n]), y = try backend.zeros([n])
                    try backend.activation(f, x, out: y)
                    let what = "\(f) \(backend.name) n=\(n)"
                    assertRelativeError(try y.floats(), Reference.activation(f, dbl(xs)), below: Bound.elementwise, what)
                    let dy = try backend.tensor(dys, shape: [n]), dx = try backend.zeros([n])
                    try backend.activationBackward(f, dY: dy, x: x, dX: dx, accumulate: false)
                    let ref = Reference.activationBackward(f, dbl(dys), x: dbl(xs))
                    assertRelativeError(try dx.floats(), ref, below: Bound.elementwise, what + " backward")
                    try backend.activationBackward(f, dY: dy, x: x, dX: dx, accumulate: true)
                    assertRelativeError(try dx.floats(), ref.map { 2 * $0 }, below: Bound.elementwise, what + " accumulate")
                }
            }
        }
    }

    /// Saturated inputs stay finite and right; NaN stays NaN (the vectorised exp paths clamp).
    func testActivationsAndSoftmaxAtExtremes() throws {
        let xs: [Float] = [-1000, -100, -88.5, -30, 30, 88.5, 100, 1000, -3, 3, 0, 1]   // 12: one lane group + tail
        for backend in try TestDevices.all() {
            for f in ActivationFunction.allCases {
                let x = try backend.tensor(xs, shape: [xs.count]), y = try backend.zeros([xs.count])
                try backend.activation(f, x, out: y)
                let got = try y.floats()
                let ref = Reference.activation(f, dbl(xs))
                for i in xs.indices {
                    XCTAssertEqual(Double(got[i]), ref[i], accuracy: 1e-6 * max(1, abs(ref[i])), "\(f) \(backend.name) x=\(xs[i])")
                }
                let dx = try backend.zeros([xs.count])
                try backend.activationBackward(f, dY: try backend.tensor([Float](repeating: 1, count: xs.count), shape: [xs.count]),
                                               x: x, dX: dx, accumulate: false)
                let dref = Reference.activationBackward(f, [Double](repeating: 1, count: xs.count), x: dbl(xs))
                for (i, g) in try dx.floats().enumerated() {
                    XCTAssertEqual(Double(g), dref[i], accuracy: 1e-5, "\(f)' \(backend.name) x=\(xs[i])")
                }
                let nan = try backend.tensor([.nan, 1, 2, 3, 4, 5, 6, 7, 8], shape: [9]), out = try backend.zeros([9])
                try backend.activation(f, nan, out: out)
                XCTAssertTrue((try out.floats())[0].isNaN, "\(f) of NaN \(backend.name)")
            }
            let row: [Float] = [0, -200, -90, 5, -1e30, 2, 3, 4, 1, 0]
            let x = try backend.tensor(row, shape: [1, row.count]), y = try backend.zeros([1, row.count])
            try backend.softmax(x, out: y, scale: 1, causal: false)
            let ref = Reference.softmax(dbl(row), features: row.count)
            for (i, v) in try y.floats().enumerated() { XCTAssertEqual(Double(v), ref[i], accuracy: 1e-7, "softmax \(backend.name) \(i)") }
        }
    }

    func testSwiGLUMatchesReference() throws {
        for backend in try TestDevices.all() {
            for (rows, h) in [(1, 1), (3, 7), (130, 37), (2, 769)] {
                let xs = randomFloats(rows * 2 * h, seed: UInt64(rows * h) + 31, in: -4...4)
                let dys = randomFloats(rows * h, seed: UInt64(rows * h) + 32)
                let x = try backend.tensor(xs, shape: [rows, 2 * h]), y = try backend.zeros([rows, h])
                try backend.swiGLU(x, out: y)
                let what = "swiGLU \(backend.name) \(rows)x\(h)"
                assertRelativeError(try y.floats(), Reference.swiGLU(dbl(xs), hidden: h), below: Bound.elementwise, what)
                let dy = try backend.tensor(dys, shape: [rows, h]), dx = try backend.zeros([rows, 2 * h])
                try backend.swiGLUBackward(dY: dy, x: x, dX: dx, accumulate: false)
                assertRelativeError(try dx.floats(), Reference.swiGLUBackward(dbl(dys), x: dbl(xs), hidden: h),
                                    below: Bound.elementwise, what + " backward")
            }
        }
    }

    func testActivationReferenceGradientsMatchFiniteDifferences() {
        let x = dbl(randomFloats(9, seed: 41, in: -4...4)), w = dbl(randomFloats(9, seed: 42))
        for f in ActivationFunction.allCases {
            assertClose(Reference.activationBackward(f, w, x: x), numericGradient(at: x) { dot(w, Reference.activation(f, $0)) }, "\(f)")
        }
        let h = 3
        let xs = dbl(randomFloats(2 * 2 * h, seed: 43, in: -3...3)), ws = dbl(randomFloats(2 * h, seed: 44))
        assertClose(Reference.swiGLUBackward(ws, x: xs, hidden: h),
                    numericGradient(at: xs) { dot(ws, Reference.swiGLU($0, hidden: h)) }, "swiGLU")
    }

    // MARK: Softmax

    func testSoftmaxMatchesReference() throws {
        // (rows, features, causal): causal rows are [B*heads, T, T] blocks.
        let cases = [(1, 1, false), (3, 7, false), (130, 37, false), (3, 769, false), (1, 1, true), (2 * 37, 37, true), (257, 257, true)]
        for backend in try TestDevices.all() {
            for (rows, f, causal) in cases {
                let scale: Float = causal ? 0.125 : 1.5
                let xs = randomFloats(rows * f, seed: UInt64(rows * f) + 51, in: -8...8), dys = randomFloats(rows * f, seed: 52)
                let x = try backend.tensor(xs, shape: [rows, f]), y = try backend.zeros([rows, f])
                try backend.softmax(x, out: y, scale: scale, causal: causal)
                let ref = Reference.softmax(dbl(xs), features: f, scale: Double(scale), causal: causal)
                let what = "softmax \(backend.name) \(rows)x\(f) causal=\(causal)"
                let got = try y.floats()
                assertRelativeError(got, ref, below: Bound.rows, what)
                if causal { XCTAssertTrue(zip(got, ref).allSatisfy { $1 != 0 || $0 == 0 }, what + ": masked entries not exactly 0") }
                let dy = try backend.tensor(dys, shape: [rows, f]), dx = try backend.zeros([rows, f])
                try backend.softmaxBackward(dY: dy, y: y, dX: dx, scale: scale, accumulate: false)
                assertRelativeError(try dx.floats(), Reference.softmaxBackward(dbl(dys), y: ref, features: f, scale: Double(scale)),
                                    below: Bound.rows, what + " backward")
                // In place: y may be x.
                try backend.softmax(x, out: x, scale: scale, causal: causal)
                assertRelativeError(try x.floats(), ref, below: Bound.rows, what + " in place")
            }
        }
    }

    func testSoftmaxReferenceGradientMatchesFiniteDifferences() {
        for causal in [false, true] {
            let f = 4, rows = 8, scale = 0.7
            let x = dbl(randomFloats(rows * f, seed: 61, in: -2...2)), w = dbl(randomFloats(rows * f, seed: 62))
            let y = Reference.softmax(x, features: f, scale: scale, causal: causal)
            assertClose(Reference.softmaxBackward(w, y: y, features: f, scale: scale),
                        numericGradient(at: x) { dot(w, Reference.softmax($0, features: f, scale: scale, causal: causal)) },
                        "softmax causal=\(causal)")
        }
    }

    // MARK: Attention layouts

    func testTransposeAxesSplitsAndMergesHeads() throws {
        for backend in try TestDevices.all() {
            // Packed QKV [B, T, 3, heads, d] -> [3, B, heads, T, d] and back.
            let shape = [2, 5, 3, 4, 3], perm = [2, 0, 3, 1, 4]
            let n = shape.reduce(1, *)
            let xs = randomFloats(n, seed: 71)
            let x = try backend.tensor(xs, shape: shape), out = try backend.zeros(perm.map { shape[$0] })
            try backend.transposeAxes(x, permutation: perm, out: out)
            XCTAssertEqual(try out.floats(), Reference.transposeAxes(xs, shape: shape, permutation: perm), "split \(backend.name)")
            let back = try backend.zeros(shape)
            try backend.transposeAxesBackward(dY: out, permutation: perm, dX: back)
            XCTAssertEqual(try back.floats(), xs, "inverse \(backend.name)")
            // Merge heads [B, heads, T, d] -> [B, T, heads, d]; a view of the Q part as input.
            let q = try out.view(offset: 0, shape: [2, 4, 5, 3])
            let merged = try backend.zeros([2, 5, 4, 3])
            try backend.transposeAxes(q, permutation: [0, 2, 1, 3], out: merged)
            XCTAssertEqual(try merged.floats(), Reference.transposeAxes(try q.floats(), shape: [2, 4, 5, 3], permutation: [0, 2, 1, 3]),
                           "merge \(backend.name)")
            // Last axis moved (element gather path) and rank 1.
            let t2 = try backend.zeros([3, 2, 4, 3, 5])
            let src = try backend.tensor(randomFloats(360, seed: 72), shape: [3, 4, 2, 5, 3])
            try backend.transposeAxes(src, permutation: [0, 2, 1, 4, 3], out: t2)
            XCTAssertEqual(try t2.floats(), Reference.transposeAxes(try src.floats(), shape: [3, 4, 2, 5, 3], permutation: [0, 2, 1, 4, 3]),
                           "gather \(backend.name)")
            // Rank 6, patch extraction: images [B, C, Hp, p, Wp, p] -> patches [B, Hp, Wp, C, p, p].
            let img = [2, 3, 2, 4, 3, 4], patchPerm = [0, 2, 4, 1, 3, 5]
            let pixels = randomFloats(img.reduce(1, *), seed: 74)
            let patches = try backend.zeros(patchPerm.map { img[$0] })
            try backend.transposeAxes(try backend.tensor(pixels, shape: img), permutation: patchPerm, out: patches)
            XCTAssertEqual(try patches.floats(), Reference.transposeAxes(pixels, shape: img, permutation: patchPerm), "patches \(backend.name)")
            let one = try backend.zeros([7])
            try backend.transposeAxes(try backend.tensor(randomFloats(7, seed: 73), shape: [7]), permutation: [0], out: one)
            XCTAssertEqual(try one.floats(), randomFloats(7, seed: 73), "rank 1 \(backend.name)")
            XCTAssertThrowsError(try backend.transposeAxes(x, permutation: [0, 1, 1, 2, 3], out: out), "bad permutation \(backend.name)")
        }
    }

    /// Multi-head attention composed from these ops and batched GEMM, forward and
    /// backward, as the model does it: split heads with transposeAxes, scores
    /// Q K^T, scaled (causal) softmax, P V, merge heads; the backward through the
    /// same ops against finite differences of the float64 reference.
    func testAttentionThroughBatchedGemmMatchesReference() throws {
        let (b, t, h, d) = (2, 5, 2, 3)
        let bh = b * h, scale = 1 / Float(d).squareRoot()
        let qkvs = randomFloats(b * t * 3 * h * d, seed: 141, in: -1.5...1.5), dOuts = randomFloats(b * t * h * d, seed: 142)
        for causal in [false, true] {
            let ref = Reference.attention(dbl(qkvs), batch: b, tokens: t, heads: h, headDim: d, scale: Double(scale), causal: causal)
            let refGrad = numericGradient(at: dbl(qkvs)) {
                dot(dbl(dOuts), Reference.attention($0, batch: b, tokens: t, heads: h, headDim: d, scale: Double(scale), causal: causal))
            }
            for backend in try TestDevices.all() {
                let what = "attention \(backend.name) causal=\(causal)"
                // Forward.
                let qkv = try backend.tensor(qkvs, shape: [b, t, 3, h, d])
                let split = try backend.zeros([3, b, h, t, d])
                try backend.transposeAxes(qkv, permutation: [2, 0, 3, 1, 4], out: split)
                let q = try split.view(offset: 0, shape: [bh, t, d])
                let k = try split.view(offset: bh * t * d, shape: [bh, t, d])
                let v = try split.view(offset: 2 * bh * t * d, shape: [bh, t, d])
                let p = try backend.zeros([bh, t, t])
                try backend.gemm(Gemm(m: t, n: t, k: d, transB: true, batch: bh), q, k, p)
                try backend.softmax(p, out: p, scale: scale, causal: causal)
                let o = try backend.zeros([b, h, t, d])
                try backend.gemm(Gemm(m: t, n: d, k: t, batch: bh), p, v, o)
                let out = try backend.zeros([b, t, h, d])
                try backend.transposeAxes(o, permutation: [0, 2, 1, 3], out: out)
                assertRelativeError(try out.floats(), ref, below: Bound.rows, what)
                // Backward.
                let dOut = try backend.tensor(dOuts, shape: [b, t, h, d])
                let dO = try backend.zeros([b, h, t, d])
                try backend.transposeAxesBackward(dY: dOut, permutation: [0, 2, 1, 3], dX: dO)
                let dSplit = try backend.zeros([3, b, h, t, d])
                let dQ = try dSplit.view(offset: 0, shape: [bh, t, d])
                let dK = try dSplit.view(offset: bh * t * d, shape: [bh, t, d])
                let dV = try dSplit.view(offset: 2 * bh * t * d, shape: [bh, t, d])
                let dP = try backend.zeros([bh, t, t])
                try backend.gemm(Gemm(m: t, n: t, k: d, transB: true, batch: bh), dO, v, dP)        // dP = dO V^T
                try backend.gemm(Gemm(m: t, n: d, k: t, transA: true, batch: bh), p, dO, dV)        // dV = P^T dO
                try backend.softmaxBackward(dY: dP, y: p, dX: dP, scale: scale, accumulate: false)  // dS (scale included)
                try backend.gemm(Gemm(m: t, n: d, k: t, batch: bh), dP, k, dQ)                      // dQ = dS K
                try backend.gemm(Gemm(m: t, n: d, k: t, transA: true, batch: bh), dP, q, dK)        // dK = dS^T Q
                let dQKV = try backend.zeros([b, t, 3, h, d])
                try backend.transposeAxesBackward(dY: dSplit, permutation: [2, 0, 3, 1, 4], dX: dQKV)
                assertRelativeError(try dQKV.floats(), refGrad, below: Bound.rows, what + " backward")
            }
        }
    }

    /// The token assembly NNOps' doc describes: patch embeddings written by a
    /// batched GEMM straight into tokens 1...N, the CLS row by a stride-0 GEMM,
    /// the CLS gradient by one GEMM with a leading dimension, positions by addBroadcast.
    func testTokenAssemblyThroughStridedGemm() throws {
        let (b, n, dm, cpp) = (2, 3, 4, 5)
        let patchs = randomFloats(b * n * cpp, seed: 151), ws = randomFloats(cpp * dm, seed: 152)
        let clss = randomFloats(dm, seed: 153), poss = randomFloats((1 + n) * dm, seed: 154)
        var expected = [Double](repeating: 0, count: b * (1 + n) * dm)
        for bi in 0..<b { for tk in 0...n { for j in 0..<dm {
            var v = tk == 0 ? Double(clss[j]) : (0..<cpp).reduce(0.0) { $0 + Double(patchs[(bi * n + tk - 1) * cpp + $1]) * Double(ws[$1 * dm + j]) }
            v += Double(poss[tk * dm + j])
            expected[(bi * (1 + n) + tk) * dm + j] = v
        } } }
        for backend in try TestDevices.all() {
            let x = try backend.zeros([b, 1 + n, dm])
            let tokens = try x.view(offset: dm, shape: [b * (1 + n) * dm - dm])
            try backend.gemm(Gemm(m: n, n: dm, k: cpp, batch: b, strideA: n * cpp, strideB: 0, strideC: (1 + n) * dm),
                             try backend.tensor(patchs, shape: [b, n, cpp]), try backend.tensor(ws, shape: [cpp, dm]), tokens)
            let one = try backend.tensor([1], shape: [1, 1]), cls = try backend.tensor(clss, shape: [1, dm])
            try backend.gemm(Gemm(m: 1, n: dm, k: 1, batch: b, strideA: 0, strideB: 0, strideC: (1 + n) * dm), one, cls, x)
            try backend.addBroadcast(try backend.tensor(poss, shape: [1 + n, dm]), to: x)
            assertRelativeError(try x.floats(), expected, below: Bound.rows, "tokens \(backend.name)")
            // dCLS = sum over images of dX[b, 0, :].
            let dcls = try backend.zeros([1, dm])
            try backend.gemm(Gemm(m: 1, n: dm, k: b, ldb: (1 + n) * dm), try backend.tensor([Float](repeating: 1, count: b), shape: [1, b]), x, dcls)
            let xs = try x.floats()
            assertRelativeError(try dcls.floats(), (0..<dm).map { j in (0..<b).reduce(0.0) { $0 + Double(xs[$1 * (1 + n) * dm + j]) } },
                                below: Bound.rows, "dCLS \(backend.name)")
        }
    }

    // MARK: Cross-entropy and argmax

    func testCrossEntropyMatchesReference() throws {
        for backend in try TestDevices.all() {
            for (rows, c, smoothing) in [(1, 1, 0.0), (3, 7, 0.1), (130, 37, 0.0), (2, 1000, 0.1), (3, 257, 0.3)] as [(Int, Int, Float)] {
                let zs = randomFloats(rows * c, seed: UInt64(rows * c) + 81, in: -10...10)
                var rng = SplitMix64(seed: UInt64(rows) + 82)
                let labels = (0..<rows).map { _ in Int32(rng.next() % UInt64(c)) }
                let z = try backend.tensor(zs, shape: [rows, c]), l = try backend.tensor(ints: labels, shape: [rows])
                let rowLoss = try backend.zeros([rows]), mean = try backend.zeros([1]), dz = try backend.zeros([rows, c])
                try backend.crossEntropy(logits: z, labels: l, labelSmoothing: smoothing, rowLoss: rowLoss, meanLoss: mean,
                                         dLogits: dz, gradientScale: 2)
                let ref = Reference.crossEntropy(dbl(zs), labels: labels, classes: c, labelSmoothing: Double(smoothing))
                let what = "crossEntropy \(backend.name) \(rows)x\(c) s=\(smoothing)"
                assertRelativeError(try rowLoss.floats(), ref.rowLoss, below: Bound.rows, what + " rows")
                assertRelativeError(try mean.floats(), [ref.mean], below: Bound.rows, what + " mean")
                assertRelativeError(try dz.floats(), ref.dLogits.map { 2 * $0 }, below: Bound.rows, what + " dLogits")
                // Evaluation only: no gradient.
                try backend.crossEntropy(logits: z, labels: l, labelSmoothing: smoothing, rowLoss: rowLoss, meanLoss: mean,
                                         dLogits: nil, gradientScale: 1)
                assertRelativeError(try mean.floats(), [ref.mean], below: Bound.rows, what + " mean, no grad")
            }
            // A label out of range poisons its row (and the mean) with NaN instead of reading out of bounds.
            let z = try backend.tensor([1, 2, 3, 4], shape: [2, 2]), l = try backend.tensor(ints: [1, 5], shape: [2])
            let rowLoss = try backend.zeros([2]), mean = try backend.zeros([1])
            try backend.crossEntropy(logits: z, labels: l, labelSmoothing: 0, rowLoss: rowLoss, meanLoss: mean, dLogits: nil, gradientScale: 1)
            let losses = try rowLoss.floats()
            XCTAssertFalse(losses[0].isNaN, backend.name)
            let meanValue = try mean.floats()[0]
            XCTAssertTrue(losses[1].isNaN && meanValue.isNaN, backend.name)
        }
    }

    func testCrossEntropyReferenceGradientMatchesFiniteDifferences() {
        let (rows, c) = (3, 5)
        let z = dbl(randomFloats(rows * c, seed: 91, in: -3...3))
        let labels: [Int32] = [0, 4, 2]
        let ref = Reference.crossEntropy(z, labels: labels, classes: c, labelSmoothing: 0.1)
        assertClose(ref.dLogits, numericGradient(at: z) {
            Reference.crossEntropy($0, labels: labels, classes: c, labelSmoothing: 0.1).mean
        }, "crossEntropy")
    }

    func testArgmaxRowsTiesToLowerIndex() throws {
        for backend in try TestDevices.all() {
            let xs: [Float] = [1, 3, 3, 0, /**/ -1, -2, -3, -4, /**/ 0, 0, 0, 5]
            let out = try backend.zeros([3], dtype: .i32)
            try backend.argmaxRows(try backend.tensor(xs, shape: [3, 4]), out: out)
            XCTAssertEqual(try out.ints(), [1, 0, 3], backend.name)
            let big = randomFloats(130 * 257, seed: 95)
            let out2 = try backend.zeros([130], dtype: .i32)
            try backend.argmaxRows(try backend.tensor(big, shape: [130, 257]), out: out2)
            XCTAssertEqual(try out2.ints(), Reference.argmaxRows(dbl(big), features: 257), backend.name)
        }
    }

    // MARK: Dropout, stochastic depth, pooling

    func testDropoutMaskIsTheReferenceMaskOnBothBackends() throws {
        let n = 4099, p: Float = 0.3, seed: UInt64 = 0xDEAD_BEEF_0123_4567
        let xs = randomFloats(n, seed: 101)
        var masks: [[Bool]] = []
        for backend in try TestDevices.all() {
            let x = try backend.tensor(xs, shape: [n]), y = try backend.zeros([n])
            try backend.dropout(x, p: p, seed: seed, out: y, accumulate: false)
            let got = try y.floats()
            assertRelativeError(got, Reference.dropout(dbl(xs), p: p, seed: seed), below: Bound.elementwise, "dropout \(backend.name)")
            let mask = got.map { $0 != 0 }
            masks.append(mask)
            let kept = Double(mask.filter { $0 }.count) / Double(n)
            XCTAssertEqual(kept, 0.7, accuracy: 0.03, "keep fraction \(backend.name)")
            // Backward: the same mask on dY.
            let dys = randomFloats(n, seed: 102)
            let dx = try backend.zeros([n])
            try backend.dropoutBackward(dY: try backend.tensor(dys, shape: [n]), p: p, seed: seed, dX: dx, accumulate: false)
            XCTAssertEqual(try dx.floats().map { $0 != 0 }, mask, "backward mask \(backend.name)")
            // Another seed, another mask; p = 0 is the identity; p = 1 drops everything.
            try backend.dropout(x, p: p, seed: seed + 1, out: y, accumulate: false)
            XCTAssertNotEqual(try y.floats().map { $0 != 0 }, mask, "seed \(backend.name)")
            try backend.dropout(x, p: 0, seed: seed, out: y, accumulate: false)
            XCTAssertEqual(try y.floats(), xs, "p=0 \(backend.name)")
            try backend.dropout(x, p: 1, seed: seed, out: y, accumulate: false)
            XCTAssertEqual(Set(try y.floats()), [0], "p=1 \(backend.name)")
        }
        if masks.count == 2 { XCTAssertEqual(masks[0], masks[1], "dropout masks differ between backends") }
    }

    /// Routing noise drawn on the device: x + std * z with z the reference's
    /// Box-Muller normals of the counter hash; standard normal in distribution.
    func testGaussianNoiseIsTheReferenceNoiseOnBothBackends() throws {
        let n = 5003, std: Float = 0.25, seed: UInt64 = 0x0123_4567_89AB_CDEF
        let xs = randomFloats(n, seed: 103)
        let reference = (0..<n).map { Double(xs[$0]) + Double(std) * Reference.gaussianNoise(seed: seed, index: $0) }
        for backend in try TestDevices.all() {
            let x = try backend.tensor(xs, shape: [n])
            try backend.addGaussianNoise(x, std: std, seed: seed)
            let got = try x.floats()
            assertRelativeError(got, reference, below: 1e-5, "gaussian noise \(backend.name)")
            let z = (0..<n).map { (Double(got[$0]) - Double(xs[$0])) / Double(std) }
            let mean = z.reduce(0, +) / Double(n), variance = z.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(n)
            XCTAssertEqual(mean, 0, accuracy: 0.05, "noise mean \(backend.name)")
            XCTAssertEqual(variance, 1, accuracy: 0.06, "noise variance \(backend.name)")
            let y = try backend.tensor(xs, shape: [n])
            try backend.addGaussianNoise(y, std: std, seed: seed + 1)
            XCTAssertNotEqual(try y.floats(), got, "another seed gives other noise \(backend.name)")
        }
    }

    func testScaleRowsAndMeanPoolMatchReference() throws {
        for backend in try TestDevices.all() {
            for (rows, f) in [(1, 1), (3, 7), (130, 37)] {
                let xs = randomFloats(rows * f, seed: UInt64(rows * f) + 111), ms = randomFloats(rows, seed: 112, in: 0...2)
                let x = try backend.tensor(xs, shape: [rows, f]), m = try backend.tensor(ms, shape: [rows])
                let y = try backend.zeros([rows, f])
                try backend.scaleRows(x, by: m, out: y, accumulate: false)
                let ref = Reference.scaleRows(dbl(xs), by: dbl(ms))
                assertRelativeError(try y.floats(), ref, below: Bound.elementwise, "scaleRows \(backend.name) \(rows)x\(f)")
                try backend.scaleRowsBackward(dY: x, by: m, dX: y, accumulate: true)
                assertRelativeError(try y.floats(), ref.map { 2 * $0 }, below: Bound.elementwise, "scaleRows accumulate \(backend.name)")
            }
            for (b, t, h, range) in [(1, 1, 1, 0..<1), (3, 7, 37, 0..<7), (2, 197, 5, 1..<197), (4, 5, 3, 0..<1)] {
                let xs = randomFloats(b * t * h, seed: UInt64(b * t * h) + 113), dys = randomFloats(b * h, seed: 114)
                let x = try backend.tensor(xs, shape: [b, t, h]), y = try backend.zeros([b, h])
                try backend.meanPool(x, tokens: range, out: y)
                let what = "meanPool \(backend.name) \(b)x\(t)x\(h) \(range)"
                assertRelativeError(try y.floats(), Reference.meanPool(dbl(xs), batch: b, tokens: t, hidden: h, range: range),
                                    below: Bound.elementwise, what)
                let dx = try backend.tensor([Float](repeating: .nan, count: b * t * h), shape: [b, t, h])
                try backend.meanPoolBackward(dY: try backend.tensor(dys, shape: [b, h]), tokens: range, dX: dx, accumulate: false)
                assertRelativeError(try dx.floats(), Reference.meanPoolBackward(dbl(dys), batch: b, tokens: t, hidden: h, range: range),
                                    below: Bound.elementwise, what + " backward")
            }
        }
    }

    func testPoolReferenceGradientMatchesFiniteDifferences() {
        let (b, t, h) = (2, 4, 3), range = 1..<4
        let x = dbl(randomFloats(b * t * h, seed: 121)), w = dbl(randomFloats(b * h, seed: 122))
        assertClose(Reference.meanPoolBackward(w, batch: b, tokens: t, hidden: h, range: range),
                    numericGradient(at: x) { dot(w, Reference.meanPool($0, batch: b, tokens: t, hidden: h, range: range)) }, "meanPool")
    }

    // MARK: Both backends on one small forward/backward chain

    /// LayerNorm -> GELU -> bias -> softmax cross-entropy and back, on both backends
    /// with the same inputs: every intermediate agrees.
    func testBackendsAgreeOnAChainOfOps() throws {
        let backends = try TestDevices.all()
        let (rows, f) = (37, 67)
        let xs = randomFloats(rows * f, seed: 131, in: -3...3), gs = randomFloats(f, seed: 132, in: 0.5...1.5)
        let bs = randomFloats(f, seed: 133)
        let labels = (0..<rows).map { Int32($0 * 7 % f) }
        var results: [[String: [Float]]] = []
        for backend in backends {
            var r: [String: [Float]] = [:]
            let x = try backend.tensor(xs, shape: [rows, f]), gamma = try backend.tensor(gs, shape: [f])
            let beta = try backend.tensor(bs, shape: [f])
            let ln = try backend.zeros([rows, f]), mean = try backend.zeros([rows]), rstd = try backend.zeros([rows])
            try backend.layerNorm(x, gamma: gamma, beta: beta, eps: 1e-5, out: ln, mean: mean, rstd: rstd)
            let act = try backend.zeros([rows, f])
            try backend.activation(.geluTanh, ln, out: act)
            try backend.addBroadcast(beta, to: act)
            let loss = try backend.zeros([rows]), meanLoss = try backend.zeros([1]), dz = try backend.zeros([rows, f])
            try backend.crossEntropy(logits: act, labels: try backend.tensor(ints: labels, shape: [rows]), labelSmoothing: 0.1,
                                     rowLoss: loss, meanLoss: meanLoss, dLogits: dz, gradientScale: 1)
            let dBias = try backend.zeros([f])
            try backend.sumRows(dz, into: dBias, accumulate: false)
            let dln = try backend.zeros([rows, f])
            try backend.activationBackward(.geluTanh, dY: dz, x: ln, dX: dln, accumulate: false)
            let dx = try backend.zeros([rows, f]), dg = try backend.zeros([f]), db = try backend.zeros([f])
            try backend.layerNormBackward(dY: dln, x: x, gamma: gamma, mean: mean, rstd: rstd, dX: dx, dGamma: dg, dBeta: db,
                                          accumulate: false)
            r["ln"] = try ln.floats(); r["act"] = try act.floats(); r["loss"] = try meanLoss.floats()
            r["dz"] = try dz.floats(); r["dBias"] = try dBias.floats(); r["dx"] = try dx.floats()
            r["dGamma"] = try dg.floats(); r["dBeta"] = try db.floats()
            results.append(r)
        }
        guard results.count == 2 else { return }
        for key in results[0].keys.sorted() {
            assertRelativeError(results[1][key]!, dbl(results[0][key]!), below: Bound.rows, "cpu vs opencl: \(key)")
        }
    }

    /// The GPU launch shapes (work-groups of 64 and 256 items with tree reductions
    /// in local memory, column-per-item partial sums, 64-wide transposes) on the
    /// CI's CPU OpenCL device, which otherwise runs one work-item per row.
    func testOpenCLWorkGroupShapesMatchReference() throws {
        _ = try TestDevices.openCLOrSkip()
        for g in [64, 256] {
            OpenCLBackend.workGroupOverride = g
            defer { OpenCLBackend.workGroupOverride = nil }
            try testLayerNormForwardAndBackwardMatchReference()
            try testRMSNormForwardAndBackwardMatchReference()
            try testAddBroadcastAndSumRowsMatchReference()
            try testSoftmaxMatchesReference()
            try testCrossEntropyMatchesReference()
            try testTransposeAxesSplitsAndMergesHeads()
            try testBackendsAgreeOnAChainOfOps()
        }
    }

    func testShapeMistakesThrow() throws {
        for backend in try TestDevices.all() {
            let x = try backend.zeros([3, 7]), g = try backend.zeros([5])
            XCTAssertThrowsError(try backend.layerNorm(x, gamma: g, beta: g, eps: 1e-5, out: x, mean: try backend.zeros([3]),
                                                       rstd: try backend.zeros([3])), backend.name)
            XCTAssertThrowsError(try backend.swiGLU(x, out: try backend.zeros([3, 4])), backend.name)
            XCTAssertThrowsError(try backend.softmax(x, out: x, scale: 1, causal: true), backend.name)
            XCTAssertThrowsError(try backend.crossEntropy(logits: x, labels: try backend.zeros([3]), labelSmoothing: 0,
                                                          rowLoss: try backend.zeros([3]), meanLoss: try backend.zeros([1]),
                                                          dLogits: nil, gradientScale: 1), "f32 labels \(backend.name)")
            XCTAssertThrowsError(try backend.meanPool(x, tokens: 0..<1, out: try backend.zeros([3])), backend.name)
        }
    }
}

/// Analytic against numerical gradients (float64 both).
func assertClose(_ analytic: [Double], _ numeric: [Double], _ what: String, file: StaticString = #filePath, line: UInt = #line) {
    let err = Reference.relativeError(analytic, numeric)
    XCTAssertLessThan(err, Bound.finiteDifference, "\(what): analytic vs finite differences \(err)", file: file, line: line)
}
