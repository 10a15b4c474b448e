import Foundation
import MoECompute
import XCTest
import MoETestSupport

/// Rotary position embedding (`PositionOps.rotary`) on both backends against the
/// float64 reference: awkward sizes, offset positions, a packed QKV view, the
/// inverse (backward), the Llama-3 frequency scaling, bad arguments.
final class RotaryTests: XCTestCase {
    /// The float32 inverse frequencies and angle (transformers' float32 path)
    /// against float64 throughout: angles up to ~300 rad carry ~2e-5 absolute error.
    static let bound = 5e-5

    static let llama31 = RotaryScaling(factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192)

    struct Case {
        var name: String
        var config: RotaryConfig
        var heads: Int
        var positions: [Int32]
    }

    static let cases: [Case] = [
        Case(name: "d=2 one head one token at 0", config: RotaryConfig(headDim: 2), heads: 1, positions: [0]),
        Case(name: "d=6 3 heads from 37", config: RotaryConfig(headDim: 6), heads: 3, positions: Array(37..<42)),
        Case(name: "d=64 9 heads theta 1e5 single token", config: RotaryConfig(headDim: 64, theta: 100000), heads: 9, positions: [211]),
        Case(name: "d=64 3 heads two sequences", config: RotaryConfig(headDim: 64, theta: 100000), heads: 3,
             positions: Array(0..<7) + Array(0..<5)),
        Case(name: "d=130 (chunk boundary) 1 head", config: RotaryConfig(headDim: 130), heads: 1, positions: [5, 300, 17]),
        Case(name: "d=64 llama3 scaling", config: RotaryConfig(headDim: 64, theta: 500000, scaling: llama31), heads: 3,
             positions: Array(250..<260)),
    ]

    func testMatchesReference() throws {
        for backend in try TestDevices.all() {
            for (ci, c) in Self.cases.enumerated() {
                for inverse in [false, true] {
                    let ld = c.heads * c.config.headDim, tokens = c.positions.count
                    let values = randomFloats(tokens * ld, seed: UInt64(ci * 2 + (inverse ? 1 : 0)))
                    let x = try backend.tensor(values, shape: [tokens, ld])
                    let pos = try backend.tensor(ints: c.positions, shape: [tokens])
                    try backend.rotary(x, heads: c.heads, positions: pos, config: c.config, inverse: inverse)
                    let ref = Reference.rotary(values.map(Double.init), heads: c.heads, ld: ld, column: 0,
                                               positions: c.positions, config: c.config, inverse: inverse)
                    assertRelativeError(try x.floats(), ref, below: Self.bound, "\(backend.name) \(c.name) inverse \(inverse)")
                }
            }
        }
    }

    /// Q and K rotated in place inside a packed `[tokens, (Hq + 2 Hkv) d + pad]`
    /// buffer; V and the padding are NaN and must stay NaN (never read into a head, never written).
    func testPackedQKVViewLeavesOtherColumnsUntouched() throws {
        let hq = 3, hkv = 1, d = 6, pad = 2, tokens = 4
        let ld = (hq + 2 * hkv) * d + pad
        let config = RotaryConfig(headDim: d)
        let positions: [Int32] = [9, 10, 11, 12]
        var values = randomFloats(tokens * ld, seed: 7)
        for t in 0..<tokens { for j in (hq + hkv) * d..<ld { values[t * ld + j] = .nan } }
        for backend in try TestDevices.all() {
            let qkv = try backend.tensor(values, shape: [tokens, ld])
            let pos = try backend.tensor(ints: positions, shape: [tokens])
            try backend.rotary(qkv, heads: hq, ld: ld, column: 0, positions: pos, config: config, inverse: false)
            try backend.rotary(qkv, heads: hkv, ld: ld, column: hq * d, positions: pos, config: config, inverse: false)
            var ref = Reference.rotary(values.map(Double.init), heads: hq, ld: ld, column: 0, positions: positions,
                                       config: config, inverse: false)
            ref = Reference.rotary(ref, heads: hkv, ld: ld, column: hq * d, positions: positions, config: config, inverse: false)
            let got = try qkv.floats()
            var heads: [Float] = [], refHeads: [Double] = []
            for t in 0..<tokens {
                for j in 0..<ld {
                    let i = t * ld + j
                    if j < (hq + hkv) * d { heads.append(got[i]); refHeads.append(ref[i]) }
                    else { XCTAssertTrue(got[i].isNaN, "\(backend.name): column \(j) of token \(t) was written") }
                }
            }
            assertRelativeError(heads, refHeads, below: Self.bound, "\(backend.name) packed Q and K")

            // The same K rotation through a view that starts at K (column 0, fewer elements than tokens * ld).
            let qkv2 = try backend.tensor(values, shape: [tokens, ld])
            let k = try qkv2.view(offset: hq * d, shape: [tokens * ld - hq * d])
            try backend.rotary(k, heads: hkv, ld: ld, column: 0, positions: pos, config: config, inverse: false)
            let got2 = try qkv2.floats()
            for t in 0..<tokens {
                for j in hq * d..<(hq + hkv) * d { XCTAssertEqual(got2[t * ld + j], got[t * ld + j], "\(backend.name) K view") }
                for j in 0..<hq * d { XCTAssertEqual(got2[t * ld + j], values[t * ld + j], "\(backend.name) Q untouched") }
            }
        }
    }

    func testInverseUndoesForward() throws {
        let config = RotaryConfig(headDim: 64, theta: 100000)
        let heads = 9, tokens = 33, ld = heads * 64
        let positions = (0..<tokens).map { Int32(1000 + 37 * $0) }
        let values = randomFloats(tokens * ld, seed: 11)
        for backend in try TestDevices.all() {
            let x = try backend.tensor(values, shape: [tokens, ld])
            let pos = try backend.tensor(ints: positions, shape: [tokens])
            try backend.rotary(x, heads: heads, positions: pos, config: config, inverse: false)
            try backend.rotary(x, heads: heads, positions: pos, config: config, inverse: true)
            assertRelativeError(try x.floats(), values.map(Double.init), below: 1e-6, "\(backend.name) inverse(forward(x))")
        }
    }

    /// Llama 3.1's scaling (factor 8, low 1, high 4, 8192 positions) by hand. theta 1e4,
    /// d 8: f = 1, 0.1, 0.01, 0.001; wavelengths 2 pi / f = 6.3, 63, 628 (below
    /// 8192 / 4: kept) and 6283 (between 2048 and 8192: smooth s = (8192 / 6283.19 - 1) / 3
    /// = 0.1012658, f = 0.001 ((1 - s) / 8 + s) = 2.1360754e-4). theta 1e5: the last
    /// wavelength 2 pi / 1e5^-0.75 = 35333 > 8192, so f = 1e5^-0.75 / 8 = 2.2228493e-5.
    func testLlama3ScalingByHand() throws {
        let a = RotaryConfig(headDim: 8, theta: 10000, scaling: Self.llama31)
        let expectA: [Double] = [1, 0.1, 0.01, 2.1360754402756862e-4]
        let b = RotaryConfig(headDim: 8, theta: 100000, scaling: Self.llama31)
        for (config, expect) in [(a, expectA), (b, [1, 0, 0, 2.2228492625486534e-05])] {
            let f32 = config.inverseFrequencies(), f64 = Reference.rotaryFrequencies(config)
            for i in [0, 3] + (config == a ? [1, 2] : []) {
                XCTAssertEqual(f64[i], expect[i], accuracy: expect[i] * 1e-12, "float64 frequency \(i) of \(config)")
                XCTAssertEqual(Double(f32[i]), expect[i], accuracy: expect[i] * 2e-7, "float32 frequency \(i) of \(config)")
            }
        }
        // And through the op: one token at position 5000, one head of d 8; the pair (0, 4) = (1, 0)
        // becomes (cos, sin) of 5000 f.
        for backend in try TestDevices.all() {
            let x = try backend.tensor([1, 0, 0, 0, 0, 0, 0, 1], shape: [1, 8])
            let pos = try backend.tensor(ints: [5000], shape: [1])
            try backend.rotary(x, heads: 1, positions: pos, config: a, inverse: false)
            let got = try x.floats(), ang = expectA.map { 5000 * $0 }
            let want: [Double] = [Foundation.cos(ang[0]), 0, 0, -Foundation.sin(ang[3]),
                                  Foundation.sin(ang[0]), 0, 0, Foundation.cos(ang[3])]
            for i in 0..<8 { XCTAssertEqual(Double(got[i]), want[i], accuracy: 2e-4, "\(backend.name) element \(i)") }
        }
    }

    func testBadArgumentsGiveOneLineShapeError() throws {
        for backend in try TestDevices.all() {
            let x = try backend.zeros([4, 12])
            let pos4 = try backend.tensor(ints: [0, 1, 2, 3], shape: [4]), pos3 = try backend.tensor(ints: [0, 1, 2], shape: [3])
            let bad: [(String, () throws -> Void)] = [
                ("odd headDim", { try backend.rotary(x, heads: 4, positions: pos4, config: RotaryConfig(headDim: 3), inverse: false) }),
                ("too few positions", { try backend.rotary(x, heads: 2, positions: pos3, config: RotaryConfig(headDim: 6), inverse: false) }),
                ("too many positions", { try backend.rotary(x, heads: 2, positions: try backend.tensor(ints: [0, 1, 2, 3, 4], shape: [5]),
                                                            config: RotaryConfig(headDim: 6), inverse: false) }),
                ("heads past the row", { try backend.rotary(x, heads: 2, ld: 12, column: 6, positions: pos4,
                                                            config: RotaryConfig(headDim: 6), inverse: false) }),
                ("f32 positions", { try backend.rotary(x, heads: 2, positions: try backend.zeros([4]),
                                                       config: RotaryConfig(headDim: 6), inverse: false) }),
            ]
            for (what, call) in bad {
                XCTAssertThrowsError(try call(), "\(backend.name) \(what)") { error in
                    XCTAssertTrue(error is ShapeError, "\(what): \(error)")
                    XCTAssertFalse("\(error)".contains("\n"), "\(what): not one line")
                }
            }
        }
    }
}
