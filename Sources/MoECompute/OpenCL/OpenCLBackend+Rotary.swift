import Foundation

/// `PositionOps` as the kernel of Kernels/rotary.cl: one work-item per
/// (token, frequency), which computes the inverse frequency and cos / sin on
/// the device (nothing uploaded per call) and rotates that pair in every head.
extension OpenCLBackend: PositionOps {
    public func rotary(_ x: Tensor, heads: Int, ld: Int, column: Int, positions: Tensor,
                       config: RotaryConfig, inverse: Bool) throws {
        let tokens = try RotaryCheck.check(x, heads: heads, ld: ld, column: column, positions: positions, config: config)
        guard tokens > 0, heads > 0 else { return }
        let items = tokens * (config.headDim / 2)
        try require(items < Int(Int32.max), "rotary: too many tokens x frequencies")
        let s = config.scaling
        let ints: [CLArg] = [tokens, heads, config.headDim, ld, column].map { .int(Int32($0)) }
        let args: [CLArg] = try arg(x) + arg(positions) + ints
            + [.float(config.theta), .int(inverse ? 1 : 0), .int(s == nil ? 0 : 1),
               .float(s?.factor ?? 1), .float(s?.lowFreqFactor ?? 1), .float(s?.highFreqFactor ?? 2),
               .float(Float(s?.originalMaxPositions ?? 1))]
        try launch1D("rotary", in: "rotary.cl", args, count: items)
    }
}
