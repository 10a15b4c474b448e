import MoECompute
import XCTest
import MoETestSupport

final class ElementwiseTests: XCTestCase {
    func testFillCopyAxpyAddScaleAgreeOnBothBackends() throws {
        for backend in try TestDevices.all() {
            for n in [1, 7, 1000, 4099] {
                let xs = randomFloats(n, seed: UInt64(n)), ys = randomFloats(n, seed: UInt64(n) + 1)
                let x = try backend.tensor(xs, shape: [n]), y = try backend.tensor(ys, shape: [n])
                try backend.axpy(-0.5, x, y)
                assertRelativeError(try y.floats(), zip(xs, ys).map { -0.5 * Double($0) + Double($1) }, below: 1e-6, "axpy \(backend.name)")
                let z = try backend.zeros([n])
                try backend.add(x, y, into: z)
                assertRelativeError(try z.floats(), zip(xs, try y.floats()).map { Double($0) + Double($1) }, below: 1e-6, "add \(backend.name)")
                try backend.scale(z, by: 3)
                try backend.copy(z, to: x)
                assertRelativeError(try x.floats(), try z.floats().map(Double.init), below: 1e-12, "copy \(backend.name)")
                try backend.fill(x, value: 2.5)
                XCTAssertEqual(Set(try x.floats()), [2.5], backend.name)
            }
        }
    }

    func testNewTensorsAreZero() throws {
        for backend in try TestDevices.all() {
            XCTAssertEqual(try backend.zeros([5, 3]).floats(), [Float](repeating: 0, count: 15), backend.name)
            XCTAssertEqual(try backend.zeros([0]).floats(), [], backend.name)
        }
    }
}
