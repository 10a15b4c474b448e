import Foundation

/// Small deterministic checks of a backend against float64 references, used by
/// `moe-gpu check` and the tests.
public enum SelfCheck {
    public static let cases: [((Int, Int, Int), Bool, Bool)] = [
        ((1, 1, 1), false, false), ((17, 33, 65), false, true), ((17, 33, 65), true, false),
        ((128, 256, 64), true, true), ((70, 90, 130), false, false),
    ]

    /// `||C - ref|| / ||ref||` for one random strided-batched GEMM with alpha, beta not 1, 0.
    public static func gemmError(backend: Backend, m: Int, n: Int, k: Int, transA: Bool, transB: Bool,
                                 batch: Int, seed: UInt64, alpha: Float = 0.75, beta: Float = -0.5) throws -> Double {
        var rng = SplitMix64(seed: seed)
        let a = (0..<(batch * m * k)).map { _ in rng.nextFloat(in: -1...1) }
        let b = (0..<(batch * k * n)).map { _ in rng.nextFloat(in: -1...1) }
        let c = (0..<(batch * m * n)).map { _ in rng.nextFloat(in: -1...1) }
        let g = Gemm(m: m, n: n, k: k, transA: transA, transB: transB, alpha: alpha, beta: beta, batch: batch)
        let ta = try backend.tensor(a, shape: [batch, transA ? k : m, transA ? m : k])
        let tb = try backend.tensor(b, shape: [batch, transB ? n : k, transB ? k : n])
        let tc = try backend.tensor(c, shape: [batch, m, n])
        try backend.gemm(g, ta, tb, tc)
        let out = try tc.floats()
        let ref = Reference.gemm(g, a.map(Double.init), b.map(Double.init), c.map(Double.init))
        return Reference.relativeError(out.map(Double.init), ref)
    }
}

/// Float64 reference implementations: slow, obvious, and the ground truth in tests.
public enum Reference {
    public static func gemm(_ g: Gemm, _ a: [Double], _ b: [Double], _ c: [Double]) -> [Double] {
        var out = c
        for bi in 0..<g.batch {
            for i in 0..<g.m {
                for j in 0..<g.n {
                    var s = 0.0
                    for p in 0..<g.k {
                        let av = g.transA ? a[bi * g.strideA + p * g.lda + i] : a[bi * g.strideA + i * g.lda + p]
                        let bv = g.transB ? b[bi * g.strideB + j * g.ldb + p] : b[bi * g.strideB + p * g.ldb + j]
                        s += av * bv
                    }
                    let idx = bi * g.strideC + i * g.ldc + j
                    out[idx] = Double(g.alpha) * s + (g.beta == 0 ? 0 : Double(g.beta) * c[idx])
                }
            }
        }
        return out
    }

    /// `||x - ref|| / ||ref||` (absolute norm when the reference is zero).
    public static func relativeError(_ x: [Double], _ ref: [Double]) -> Double {
        precondition(x.count == ref.count)
        var num = 0.0, den = 0.0
        for i in 0..<x.count {
            let d = x[i] - ref[i]
            if d.isNaN { return .infinity }
            num += d * d; den += ref[i] * ref[i]
        }
        return den == 0 ? num.squareRoot() : (num / den).squareRoot()
    }
}

/// A small, fast, seedable generator (SplitMix64): the same seed gives the
/// same numbers on every machine.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in the closed range, from the top 24 bits.
    public mutating func nextFloat(in range: ClosedRange<Float>) -> Float {
        let u = Float(next() >> 40) / Float(1 << 24)
        return range.lowerBound + u * (range.upperBound - range.lowerBound)
    }
    /// Standard normal (Box-Muller).
    public mutating func nextGaussian() -> Float {
        let u1 = max(Double(next() >> 11) / Double(1 << 53), 1e-300)
        let u2 = Double(next() >> 11) / Double(1 << 53)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * .pi * u2))
    }
}
