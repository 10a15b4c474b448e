@testable import MoECompute
import XCTest
import MoETestSupport

/// Grouped GEMM (experts' row segments and weight-gradient contraction) with
/// the bias/activation epilogue, on every backend and kernel variant.
final class GroupedGemmTests: XCTestCase {
    func backends() throws -> [(String, Backend)] {
        var out: [(String, Backend)] = [("cpu", TestDevices.cpu)]
        guard let cl = try TestDevices.openCLHalf() else { return out }
        out.append(("opencl default", cl))
        for (label, tuning) in try TestDevices.gemmVariants() {
            out.append(("opencl \(label)", try OpenCLBackend(device: cl.device, tuning: tuning)))
        }
        return out
    }

    /// Segment sizes with empty experts, a dominant expert, and one-row experts.
    let layouts: [[Int]] = [[0, 5, 0, 1, 37, 0, 2, 19], [70], [0, 0, 3], [1], [0, 64, 1, 0]]

    func offsets(_ counts: [Int]) -> [Int32] {
        var o: [Int32] = [0]
        for c in counts { o.append(o.last! + Int32(c)) }
        return o
    }

    func referenceRows(x: [Double], w: [Double], bias: [Double]?, counts: [Int], n: Int, k: Int,
                       activation: Activation) -> [Double] {
        let off = offsets(counts)
        var y = [Double](repeating: 0, count: Int(off.last!) * n)
        for e in 0..<counts.count {
            for r in Int(off[e])..<Int(off[e + 1]) {
                for j in 0..<n {
                    var s = 0.0
                    for p in 0..<k { s += x[r * k + p] * w[e * n * k + j * k + p] }   // y = x W_e^T
                    if let bias { s += bias[e * n + j] }
                    y[r * n + j] = Double(activation.apply(Float(s)))
                }
            }
        }
        return y
    }

    func testRowSegmentsMatchThePerExpertReference() throws {
        for (label, backend) in try backends() {
            for counts in layouts {
                for (n, k) in [(9, 13), (33, 1), (40, 70)] {
                    let e = counts.count, rows = counts.reduce(0, +)
                    let seed = UInt64(rows * 31 + n * 7 + k)
                    let x = randomFloats(rows * k, seed: seed), w = randomFloats(e * n * k, seed: seed + 1)
                    let bias = randomFloats(e * n, seed: seed + 2)
                    for activation in [Activation.none, .gelu] {
                        let useBias = activation == .gelu
                        let tx = try backend.tensor(x, shape: [rows, k]), tw = try backend.tensor(w, shape: [e, n, k])
                        let ty = try backend.tensor([Float](repeating: .nan, count: rows * n), shape: [rows, n])
                        let to = try backend.tensor(ints: offsets(counts), shape: [e + 1])
                        let tb = try backend.tensor(bias, shape: [e, n])
                        try backend.gemm(Gemm(m: rows, n: n, k: k, transB: true, batch: e, strideB: n * k), tx, tw, ty,
                                         grouping: .rows(offsets: to), epilogue: GemmEpilogue(bias: useBias ? tb : nil, activation: activation))
                        let ref = referenceRows(x: x.map(Double.init), w: w.map(Double.init), bias: useBias ? bias.map(Double.init) : nil,
                                                counts: counts, n: n, k: k, activation: activation)
                        assertRelativeError(try ty.floats(), ref, below: 1e-5, "\(label) rows \(counts) n=\(n) k=\(k) \(activation)")
                    }
                }
            }
        }
    }

    /// dW_e = dY_e^T X_e over each expert's rows; empty experts give zero.
    func testContractionGivesPerExpertWeightGradients() throws {
        for (label, backend) in try backends() {
            for counts in layouts {
                let e = counts.count, rows = counts.reduce(0, +), n = 11, k = 35
                let dy = randomFloats(rows * n, seed: UInt64(rows + 5)), x = randomFloats(rows * k, seed: UInt64(rows + 6))
                let off = offsets(counts)
                var ref = [Double](repeating: 0, count: e * n * k)
                for ex in 0..<e { for r in Int(off[ex])..<Int(off[ex + 1]) { for i in 0..<n { for j in 0..<k {
                    ref[ex * n * k + i * k + j] += Double(dy[r * n + i]) * Double(x[r * k + j])
                } } } }
                let tdy = try backend.tensor(dy, shape: [rows, n]), tx = try backend.tensor(x, shape: [rows, k])
                let tdw = try backend.tensor([Float](repeating: .nan, count: e * n * k), shape: [e, n, k])
                let to = try backend.tensor(ints: off, shape: [e + 1])
                try backend.gemm(Gemm(m: n, n: k, k: rows, transA: true, batch: e, lda: n, ldb: k, strideC: n * k),
                                 tdy, tx, tdw, grouping: .contraction(offsets: to), epilogue: .none)
                assertRelativeError(try tdw.floats(), ref, below: 1e-5, "\(label) contraction \(counts)")

                // The same gradient with X stored transposed ([k, rows]): exercises transB.
                var xt = [Float](repeating: 0, count: rows * k)
                for r in 0..<rows { for j in 0..<k { xt[j * rows + r] = x[r * k + j] } }
                let txt = try backend.tensor(xt, shape: [k, rows])
                try backend.fill(tdw, value: .nan)
                try backend.gemm(Gemm(m: n, n: k, k: rows, transA: true, transB: true, batch: e, lda: n, ldb: rows, strideC: n * k),
                                 tdy, txt, tdw, grouping: .contraction(offsets: to), epilogue: .none)
                assertRelativeError(try tdw.floats(), ref, below: 1e-5, "\(label) contraction transB \(counts)")
            }
        }
    }

    func testBatchedEpilogueAddsBiasAndActivates() throws {
        for (label, backend) in try backends() {
            let m = 19, n = 37, k = 8
            let a = randomFloats(m * k, seed: 1), b = randomFloats(k * n, seed: 2), bias = randomFloats(n, seed: 3)
            for activation in Activation.allCases {
                let c = try backend.zeros([m, n])
                try backend.gemm(Gemm(m: m, n: n, k: k), try backend.tensor(a, shape: [m, k]), try backend.tensor(b, shape: [k, n]), c,
                                 grouping: .batch, epilogue: GemmEpilogue(bias: try backend.tensor(bias, shape: [n]), activation: activation))
                var ref = Reference.gemm(Gemm(m: m, n: n, k: k), a.map(Double.init), b.map(Double.init), [Double](repeating: 0, count: m * n))
                for i in 0..<m { for j in 0..<n { ref[i * n + j] = Double(activation.apply(Float(ref[i * n + j] + Double(bias[j])))) } }
                assertRelativeError(try c.floats(), ref, below: 1e-5, "\(label) epilogue \(activation)")
            }
        }
    }

    /// SwiGLU experts in one pass: y = silu(x Wg^T + bg) * (x Wu^T + bu), W = [gate; value] per expert.
    func testSwiGLUEpilogueMatchesTheReference() throws {
        for (label, backend) in try backends() {
            for counts in layouts {
                for (n, k) in [(9, 13), (40, 70), (33, 1)] {
                    let e = counts.count, rows = counts.reduce(0, +)
                    let seed = UInt64(rows * 13 + n + k)
                    let x = randomFloats(rows * k, seed: seed), w = randomFloats(e * 2 * n * k, seed: seed + 1)
                    let bias = randomFloats(e * 2 * n, seed: seed + 2)
                    let off = offsets(counts)
                    var ref = [Double](repeating: .nan, count: rows * n)
                    for ex in 0..<e { for r in Int(off[ex])..<Int(off[ex + 1]) { for j in 0..<n {
                        var gate = Double(bias[ex * 2 * n + j]), value = Double(bias[ex * 2 * n + n + j])
                        for p in 0..<k {
                            gate += Double(x[r * k + p]) * Double(w[(ex * 2 * n + j) * k + p])
                            value += Double(x[r * k + p]) * Double(w[(ex * 2 * n + n + j) * k + p])
                        }
                        ref[r * n + j] = gate / (1 + exp(-gate)) * value
                    } } }
                    let ty = try backend.tensor([Float](repeating: .nan, count: rows * n), shape: [rows, n])
                    try backend.gemm(Gemm(m: rows, n: n, k: k, transB: true, batch: e, ldb: k, strideB: 2 * n * k),
                                     try backend.tensor(x, shape: [rows, k]), try backend.tensor(w, shape: [e, 2 * n, k]), ty,
                                     grouping: .rows(offsets: try backend.tensor(ints: off, shape: [e + 1])),
                                     epilogue: GemmEpilogue(bias: try backend.tensor(bias, shape: [e, 2 * n]), swiGLU: true))
                    assertRelativeError(try ty.floats(), ref, below: 1e-5, "\(label) swiGLU \(counts) n=\(n) k=\(k)")
                }
            }
            // Plain (batched) form with B untransposed: [k, 2n].
            let m = 7, n = 20, k = 5
            let a = randomFloats(m * k, seed: 4), bw = randomFloats(k * 2 * n, seed: 5)
            let c = try backend.zeros([m, n])
            try backend.gemm(Gemm(m: m, n: n, k: k, ldb: 2 * n), try backend.tensor(a, shape: [m, k]),
                             try backend.tensor(bw, shape: [k, 2 * n]), c, grouping: .batch, epilogue: GemmEpilogue(swiGLU: true))
            var ref = [Double](repeating: 0, count: m * n)
            for i in 0..<m { for j in 0..<n {
                var gate = 0.0, value = 0.0
                for p in 0..<k { gate += Double(a[i * k + p]) * Double(bw[p * 2 * n + j]); value += Double(a[i * k + p]) * Double(bw[p * 2 * n + n + j]) }
                ref[i * n + j] = gate / (1 + exp(-gate)) * value
            } }
            assertRelativeError(try c.floats(), ref, below: 1e-5, "\(label) swiGLU batched")
        }
    }

    func testBadOffsetsAreRejected() throws {
        let cpu = TestDevices.cpu
        let x = try cpu.zeros([4, 3]), w = try cpu.zeros([2, 5, 3]), y = try cpu.zeros([4, 5])
        let wrongCount = try cpu.tensor(ints: [0, 4], shape: [2])
        XCTAssertThrowsError(try cpu.gemm(Gemm(m: 4, n: 5, k: 3, transB: true, batch: 2, strideB: 15), x, w, y,
                                          grouping: .rows(offsets: wrongCount), epilogue: .none))
    }
}
