import MoECompute
import XCTest
import MoETestSupport

final class GemmTests: XCTestCase {
    let shapes = [(1, 1, 1), (17, 33, 65), (128, 256, 64)]

    func checkAllTransposes(_ backend: Backend) throws {
        for (m, n, k) in shapes {
            for transA in [false, true] {
                for transB in [false, true] {
                    let err = try SelfCheck.gemmError(backend: backend, m: m, n: n, k: k, transA: transA, transB: transB,
                                                      batch: 3, seed: UInt64(m * 1000 + n + k), alpha: 0.7, beta: -1.3)
                    XCTAssertLessThan(err, 1e-5, "\(backend.name) \(m)x\(n)x\(k) transA=\(transA) transB=\(transB)")
                }
            }
        }
    }

    func testCPUGemmMatchesFloat64Reference() throws { try checkAllTransposes(TestDevices.cpu) }

    func testOpenCLGemmMatchesFloat64Reference() throws { try checkAllTransposes(try TestDevices.openCLOrSkip()) }

    /// beta = 0 must overwrite C even when it holds NaN (as BLAS does).
    func testBetaZeroIgnoresNaNInC() throws {
        for backend in try TestDevices.all() {
            let a = try backend.tensor([1, 2, 3, 4], shape: [2, 2])
            let c = try backend.tensor([.nan, .nan, .nan, .nan], shape: [2, 2])
            try backend.gemm(Gemm(m: 2, n: 2, k: 2), a, a, c)
            XCTAssertEqual(try c.floats(), [7, 10, 15, 22], backend.name)
        }
    }

    /// Views and leading dimensions: multiply the right half of a 4x6 matrix.
    func testLeadingDimensionsAndOffsets() throws {
        for backend in try TestDevices.all() {
            let values = (0..<24).map { Float($0) }
            let a = try backend.tensor(values, shape: [4, 6])
            let view = try a.view(offset: 3, shape: [21])
            let b = try backend.tensor([1, 0, 0, 1, 1, 1], shape: [3, 2])
            let c = try backend.zeros([4, 2])
            try backend.gemm(Gemm(m: 4, n: 2, k: 3, lda: 6), view, b, c)
            let ref = Reference.gemm(Gemm(m: 4, n: 2, k: 3, lda: 6), Array(values[3...]).map(Double.init),
                                     [1, 0, 0, 1, 1, 1], [Double](repeating: 0, count: 8))
            XCTAssertEqual(try c.floats().map(Double.init), ref, backend.name)
        }
    }

    func testShapeMismatchThrows() throws {
        for backend in try TestDevices.all() {
            let a = try backend.zeros([2, 3]), c = try backend.zeros([2, 2])
            XCTAssertThrowsError(try backend.gemm(Gemm(m: 2, n: 2, k: 4), a, a, c), backend.name)
        }
    }
}

/// The tiled GPU kernel and the CPU-device kernel are both checked on
/// whatever OpenCL device is present (PoCL in CI), whichever the device would pick.
final class GemmKernelVariantTests: XCTestCase {
    func testOpenCLEveryKernelVariantMatchesTheReference() throws {
        let device = try TestDevices.openCLOrSkip().device
        for (label, tuning) in try TestDevices.gemmVariants() {
            let backend = try OpenCLBackend(device: device, tuning: tuning)
            for (m, n, k) in [(1, 1, 1), (17, 33, 65), (70, 90, 130), (5, 100, 3)] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let err = try SelfCheck.gemmError(backend: backend, m: m, n: n, k: k, transA: ta, transB: tb,
                                                      batch: 2, seed: UInt64(m + n * 7 + k * 13))
                    XCTAssertLessThan(err, 1e-5, "\(label) \(m)x\(n)x\(k) transA=\(ta) transB=\(tb)")
                }
            }
        }
    }
}
