import CKernels
import Foundation

/// `PositionOps` on the host: the inverse frequencies are computed here per call
/// (`headDim / 2` floats), the rotation is `ck_rotary` (Sources/CKernels/rotary.c),
/// split over the cores by tokens.
extension CPUBackend: PositionOps {
    public func rotary(_ x: Tensor, heads: Int, ld: Int, column: Int, positions: Tensor,
                       config: RotaryConfig, inverse: Bool) throws {
        let tokens = try RotaryCheck.check(x, heads: heads, ld: ld, column: column, positions: positions, config: config)
        let px = try f32(x), pp = try i32(positions)
        guard tokens > 0, heads > 0 else { counters.launch(); return }
        let freqs = config.inverseFrequencies()
        freqs.withUnsafeBufferPointer { f in
            parallelFor(tokens, work: tokens * heads * config.headDim * 4) { range in
                ck_rotary(px, pp, f.baseAddress, Int64(heads), Int64(config.headDim), Int64(ld), Int64(column),
                          inverse ? 1 : 0, Int64(range.lowerBound), Int64(range.upperBound))
            }
        }
    }
}
