import MoECompute
import XCTest
import MoETestSupport

final class OptimTests: XCTestCase {
    /// Five AdamW steps with fresh gradients each step, two weight-decay groups,
    /// against the float64 reference. Bound: 1e-5 relative on parameters and moments.
    func testAdamWStepsMatchFloat64Reference() throws {
        let sizes = [1, 37, 1000, 4099]
        let decays: [Float] = [0.1, 0, 0.05, 0]
        let config = AdamWConfig(learningRate: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8)
        for backend in try TestDevices.all() {
            var refP = sizes.enumerated().map { dbl(randomFloats($1, seed: UInt64($0) + 1)) }
            var refM = sizes.map { [Double](repeating: 0, count: $0) }, refV = refM
            let groups = try sizes.enumerated().map { i, n in
                AdamWTensors(param: try backend.tensor(refP[i].map(Float.init), shape: [n]), grad: try backend.zeros([n]),
                             m: try backend.zeros([n]), v: try backend.zeros([n]), weightDecay: decays[i])
            }
            for step in 1...5 {
                for (i, g) in groups.enumerated() {
                    let grad = randomFloats(sizes[i], seed: UInt64(100 * step + i), in: -2...2)
                    try g.grad.write(grad)
                    let r = Reference.adamW(param: refP[i], grad: dbl(grad), m: refM[i], v: refV[i], config: config,
                                            weightDecay: Double(decays[i]), step: step)
                    refP[i] = r.param; refM[i] = r.m; refV[i] = r.v
                }
                try backend.adamWStep(groups, config: config, step: step)
            }
            for (i, g) in groups.enumerated() {
                let what = "adamW \(backend.name) n=\(sizes[i])"
                assertRelativeError(try g.param.floats(), refP[i], below: 1e-5, what + " param")
                assertRelativeError(try g.m.floats(), refM[i], below: 1e-5, what + " m")
                assertRelativeError(try g.v.floats(), refV[i], below: 1e-5, what + " v")
            }
            XCTAssertThrowsError(try backend.adamWStep(groups, config: config, step: 0), "step 0 \(backend.name)")
        }
    }

    /// Weight decay applies only to the groups that ask for it: with a zero gradient,
    /// a decayed parameter shrinks by exactly lr * wd and an undecayed one stays.
    func testWeightDecayIsPerGroup() throws {
        for backend in try TestDevices.all() {
            let a = try backend.tensor([2, -4], shape: [2]), b = try backend.tensor([2, -4], shape: [2])
            let config = AdamWConfig(learningRate: 0.1)
            try backend.adamWStep([
                AdamWTensors(param: a, grad: try backend.zeros([2]), m: try backend.zeros([2]), v: try backend.zeros([2]), weightDecay: 0.5),
                AdamWTensors(param: b, grad: try backend.zeros([2]), m: try backend.zeros([2]), v: try backend.zeros([2]), weightDecay: 0),
            ], config: config, step: 1)
            assertRelativeError(try a.floats(), [2 * 0.95, -4 * 0.95], below: 1e-6, "decayed \(backend.name)")
            XCTAssertEqual(try b.floats(), [2, -4], "undecayed \(backend.name)")
        }
    }

    func testGlobalNormMatchesReferenceAndIsDeterministic() throws {
        // Empty, single-element, odd and multi-work-group tensors, and a view.
        let sizes = [0, 1, 7, 257, 70_001]
        let values = sizes.enumerated().map { randomFloats($1, seed: UInt64($0) + 200, in: -3...3) }
        let ref = Reference.globalNorm(values.map(dbl))
        var norms: [Float] = []
        for backend in try TestDevices.all() {
            let tensors = try zip(sizes, values).map { try backend.tensor($1, shape: [$0]) }
            let norm = try backend.zeros([1])
            try backend.globalNorm(tensors, into: norm)
            let first = try norm.floats()[0]
            assertRelativeError([first], [ref], below: 1e-6, "globalNorm \(backend.name)")
            try backend.globalNorm(tensors, into: norm)
            XCTAssertEqual(try norm.floats()[0], first, "repeat \(backend.name)")
            XCTAssertEqual(try backend.globalNorm(tensors), first, "host convenience \(backend.name)")
            let view = try tensors[4].view(offset: 3, shape: [100])
            assertRelativeError([try backend.globalNorm([view])], [Reference.globalNorm([dbl(Array(values[4][3..<103]))])],
                                below: 1e-6, "view \(backend.name)")
            XCTAssertEqual(try backend.globalNorm([]), 0, "no tensors \(backend.name)")
            norms.append(first)
        }
        if norms.count == 2 { XCTAssertEqual(Double(norms[0]), Double(norms[1]), accuracy: 1e-6 * ref, "cpu vs opencl") }
    }

    /// The GPU reduction shape (work-groups of 256 items) on the CI's CPU OpenCL device.
    func testOpenCLGlobalNormWithWorkGroupsOfManyItems() throws {
        _ = try TestDevices.openCLOrSkip()
        OpenCLBackend.workGroupOverride = 256
        defer { OpenCLBackend.workGroupOverride = nil }
        try testGlobalNormMatchesReferenceAndIsDeterministic()
        try testClippingScalesByMaxNormOverNorm()
    }

    func testClippingScalesByMaxNormOverNorm() throws {
        for backend in try TestDevices.all() {
            let a = randomFloats(37, seed: 301, in: -2...2), b = randomFloats(1000, seed: 302, in: -2...2)
            let ref = Reference.globalNorm([dbl(a), dbl(b)])
            // Above the limit: scaled to norm maxNorm.
            let ta = try backend.tensor(a, shape: [37]), tb = try backend.tensor(b, shape: [1000])
            let maxNorm = Float(ref / 4)
            let before = try backend.clipGradients([ta, tb], maxNorm: maxNorm)
            assertRelativeError([before], [ref], below: 1e-6, "norm before clipping \(backend.name)")
            let factor = Double(maxNorm) / Double(before)
            assertRelativeError(try ta.floats() + tb.floats(), dbl(a + b).map { $0 * factor }, below: 1e-6, "clipped \(backend.name)")
            assertRelativeError([try backend.globalNorm([ta, tb])], [Double(maxNorm)], below: 1e-5, "norm after \(backend.name)")
            // Below the limit: untouched, bit for bit.
            let tc = try backend.tensor(a, shape: [37])
            try backend.clipGradients([tc], maxNorm: 1e6)
            XCTAssertEqual(try tc.floats(), a, "unclipped \(backend.name)")
            // Zero and NaN norms leave the tensors alone.
            let zero = try backend.zeros([5])
            XCTAssertEqual(try backend.clipGradients([zero], maxNorm: 1), 0, backend.name)
            XCTAssertEqual(try zero.floats(), [0, 0, 0, 0, 0], backend.name)
            let td = try backend.tensor(a, shape: [37])
            try backend.clipByNorm([td], maxNorm: 1, norm: try backend.tensor([.nan], shape: [1]))
            XCTAssertEqual(try td.floats(), a, "NaN norm \(backend.name)")
            // zeroGradients
            try backend.zeroGradients([ta, tb])
            XCTAssertEqual(Set(try ta.floats() + tb.floats()), [0], backend.name)
        }
    }
}
