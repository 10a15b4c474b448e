import CKernels
import Foundation
import MoECompute
import XCTest
import MoETestSupport

/// The CPU backend's C loops (CKernels/elementwise.c): the GELU/erf maths
/// against float64 at the edges of its approximation, the run-time dispatch,
/// and the fixed summation order of the column sums.
final class VectorKernelTests: XCTestCase {
    /// A few thousand inputs: a dense grid over [-8, 8] (odd count, so lane
    /// groups and tails both see every region), each side of the erf saturation
    /// point |x / sqrt 2| = 3.9, large magnitudes, zeros, subnormals, +-inf, NaN.
    func geluInputs() -> [Float] {
        var xs: [Float] = (0..<4001).map { -8 + 16 * Float($0) / 4000 }
        let edge = Float(3.9 * 2.0.squareRoot())
        for e in [edge, -edge] {
            var v = e
            for _ in 0..<4 { v = v.nextDown }
            for _ in 0..<9 { xs.append(v); v = v.nextUp }
        }
        for m: Float in [10, 100, 1e3, 1e6, 1e10, 1e19, 1e20, 1e30, .greatestFiniteMagnitude,
                         .leastNonzeroMagnitude, .leastNormalMagnitude, 1e-30] {
            xs += [m, -m]
        }
        xs += [0, -0.0, .infinity, -.infinity, .nan, 1, .nan]
        return xs
    }

    /// Same NaN-ness, else within `tolerance(ref)` of the float64 value.
    func assertMatches(_ got: [Float], _ ref: [Double], _ xs: [Float], _ what: String,
                       tolerance: (Double) -> Double, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(got.count, ref.count, what, file: file, line: line)
        var worst = 0.0
        for i in got.indices {
            let g = Double(got[i]), r = ref[i]
            if r.isNaN || g.isNaN {
                XCTAssertTrue(r.isNaN && g.isNaN, "\(what) x=\(xs[i]): got \(g), reference \(r)", file: file, line: line)
                continue
            }
            if r.isInfinite || g.isInfinite {
                XCTAssertEqual(g, r, "\(what) x=\(xs[i])", file: file, line: line)
                continue
            }
            let err = abs(g - r)
            worst = max(worst, err / tolerance(r))
            XCTAssertLessThanOrEqual(err, tolerance(r), "\(what) x=\(xs[i]): got \(g), reference \(r)", file: file, line: line)
        }
        XCTAssertLessThanOrEqual(worst, 1, what, file: file, line: line)
    }

    func testGeluErfMatchesFloat64AtTheEdges() throws {
        let xs = geluInputs()
        XCTAssertGreaterThan(xs.count, 4000)
        let backend = CPUBackend()
        let x = try backend.tensor(xs, shape: [xs.count]), y = try backend.zeros([xs.count])
        try backend.activation(.geluErf, x, out: y)
        let ref = xs.map { Reference.activation(.geluErf, Double($0)) }
        assertMatches(try y.floats(), ref, xs, "geluErf", tolerance: { 1e-6 * max(1, abs($0)) })

        // The derivative over the finite inputs (at -inf the float64 one is NaN:
        // -inf * exp(-inf); the float clamp of exp gives -inf instead).
        let finite = xs.filter { !$0.isInfinite }
        let xf = try backend.tensor(finite, shape: [finite.count])
        let dy = try backend.tensor([Float](repeating: 1, count: finite.count), shape: [finite.count])
        let dx = try backend.zeros([finite.count])
        try backend.activationBackward(.geluErf, dY: dy, x: xf, dX: dx, accumulate: false)
        let dref = finite.map { Reference.activationDerivative(.geluErf, Double($0)) }
        assertMatches(try dx.floats(), dref, finite, "geluErf'", tolerance: { _ in 2e-6 })
        try backend.activationBackward(.geluErf, dY: dy, x: xf, dX: dx, accumulate: true)
        assertMatches(try dx.floats(), dref.map { 2 * $0 }, finite, "geluErf' accumulate", tolerance: { _ in 4e-6 })
    }

    /// erf itself: exactly +-1 past |a| = 3.9, the rational just inside, NaN through.
    func testErfSaturatesExactlyBeyondThreePointNine() {
        var a: [Float] = (0..<2001).map { -5 + 10 * Float($0) / 2000 }
        for e: Float in [3.9, -3.9] { a += [e.nextDown, e, e.nextUp] }
        a += [1e20, -1e20, .greatestFiniteMagnitude, -.greatestFiniteMagnitude, .infinity, -.infinity, .nan]
        var y = [Float](repeating: 0, count: a.count)
        a.withUnsafeBufferPointer { pa in
            y.withUnsafeMutableBufferPointer { py in ck_erf(pa.baseAddress, py.baseAddress, a.count) }
        }
        for (i, v) in a.enumerated() {
            if v.isNaN { XCTAssertTrue(y[i].isNaN, "erf(NaN)"); continue }
            if v > 3.9 { XCTAssertEqual(y[i], 1, "erf(\(v))") } else if v < -3.9 { XCTAssertEqual(y[i], -1, "erf(\(v))") } else {
                XCTAssertEqual(Double(y[i]), erf(Double(v)), accuracy: 5e-7, "erf(\(v))")
            }
        }
    }

    /// The same element gives the same bits wherever the thread split or the
    /// vector tail puts it.
    func testActivationsDoNotDependOnTheOffset() throws {
        let backend = CPUBackend()
        let xs = randomFloats(1 << 16, seed: 41, in: -7...7)
        for f in ActivationFunction.allCases {
            let whole = try backend.zeros([xs.count])
            try backend.activation(f, try backend.tensor(xs, shape: [xs.count]), out: whole)
            let w = try whole.floats()
            for start in [1, 5, 13] {
                let part = Array(xs[start..<(start + 37)])
                let y = try backend.zeros([part.count])
                try backend.activation(f, try backend.tensor(part, shape: [part.count]), out: y)
                XCTAssertEqual(try y.floats(), Array(w[start..<(start + 37)]), "\(f) at offset \(start)")
            }
        }
    }

    /// sumRows is exactly the fixed order: per column, blocks of 64 rows summed
    /// in order into a partial, partials added in order to a zeroed total.
    func testSumRowsIsTheFixedBlockOrder() throws {
        let backend = CPUBackend()
        for (rows, cols) in [(1, 3), (64, 16), (65, 17), (1000, 96), (6400, 64), (300, 131)] {
            let xs = randomFloats(rows * cols, seed: UInt64(rows * 31 + cols), in: -3...3)
            var expect = [Float](repeating: 0, count: cols)
            for c in 0..<cols {
                var total: Float = 0
                for r0 in stride(from: 0, to: rows, by: 64) {
                    var part: Float = 0
                    for r in r0..<min(rows, r0 + 64) { part += xs[r * cols + c] }
                    total += part
                }
                expect[c] = total
            }
            let out = try backend.zeros([cols])
            try backend.sumRows(try backend.tensor(xs, shape: [rows, cols]), into: out, accumulate: false)
            XCTAssertEqual(try out.floats(), expect, "sumRows \(rows)x\(cols)")
        }
    }

    /// On an x86 machine with AVX2, the loader picks a vector clone (256 or 512 bits).
    func testDispatchPicksAVXOnX86() throws {
        let bits = Int(ck_vector_bits())
        XCTAssertTrue([128, 256, 512].contains(bits), "ck_vector_bits() = \(bits)")
        #if arch(x86_64) && os(Linux)
        guard let cpuinfo = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let flags = cpuinfo.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else {
            throw XCTSkip("no /proc/cpuinfo flags")
        }
        let set = Set(flags.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == ":" }).map(String.init))
        guard set.contains("avx2"), set.contains("fma") else { throw XCTSkip("CPU without AVX2+FMA") }
        XCTAssertGreaterThan(bits, 128, "AVX2 CPU but the baseline clone was picked")
        if ["avx512f", "avx512bw", "avx512dq", "avx512vl"].allSatisfy(set.contains) {
            XCTAssertEqual(bits, 512, "AVX-512 CPU but not the x86-64-v4 clone")
        }
        #else
        throw XCTSkip("not x86-64 Linux")
        #endif
    }
}
