import Foundation

/// Llama-3 rope scaling (`rope_scaling` with `rope_type: "llama3"`), as
/// transformers' `_compute_llama3_parameters` applies it to the inverse
/// frequencies: wavelengths `2 pi / f` above `originalMaxPositions / lowFreqFactor`
/// are divided by `factor`, those below `originalMaxPositions / highFreqFactor`
/// are kept, and in between `f` is interpolated smoothly.
public struct RotaryScaling: Sendable, Equatable {
    public var factor: Float
    public var lowFreqFactor: Float
    public var highFreqFactor: Float
    public var originalMaxPositions: Int

    public init(factor: Float, lowFreqFactor: Float, highFreqFactor: Float, originalMaxPositions: Int) {
        self.factor = factor; self.lowFreqFactor = lowFreqFactor
        self.highFreqFactor = highFreqFactor; self.originalMaxPositions = originalMaxPositions
    }
}

/// Rotary position embedding of one attention projection.
public struct RotaryConfig: Sendable, Equatable {
    /// Elements per head; even. Element `i` and `i + headDim/2` of a head rotate
    /// together (the Llama / Hugging Face `rotate_half` layout, not interleaved pairs).
    public var headDim: Int
    /// `rope_theta`: 10000 for Llama 2, 100000 for SmolLM2-135M, 500000 for Llama 3.
    public var theta: Float
    /// Llama-3 frequency scaling, or nil for plain RoPE.
    public var scaling: RotaryScaling?

    public init(headDim: Int, theta: Float = 10000, scaling: RotaryScaling? = nil) {
        self.headDim = headDim; self.theta = theta; self.scaling = scaling
    }

    /// The `headDim / 2` inverse frequencies exactly as transformers computes them
    /// in float32: `1 / theta ** (float32(2i) / headDim)` (the power correctly
    /// rounded to float32, as float32 `pow` gives it within an ulp), then the
    /// Llama-3 scaling evaluated in float32 in transformers' operation order.
    /// The OpenCL kernel computes the same values on the device (see rotary.cl).
    public func inverseFrequencies() -> [Float] {
        let half = headDim / 2
        return (0..<half).map { i in
            let exponent = Float(2 * i) / Float(headDim)
            let p = Float(Foundation.pow(Double(theta), Double(exponent)))
            let f: Float = 1 / p
            guard let s = scaling else { return f }
            return Self.llama3(f, s)
        }
    }

    /// transformers' `_compute_llama3_parameters` for one frequency, float32 throughout.
    static func llama3(_ f: Float, _ s: RotaryScaling) -> Float {
        let old = Float(s.originalMaxPositions)
        let lowWavelen = old / s.lowFreqFactor, highWavelen = old / s.highFreqFactor
        let wavelen = Float(2 * Double.pi) / f
        if wavelen > lowWavelen { return f / s.factor }
        if wavelen < highWavelen { return f }
        let smooth = (old / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor)
        let a = (1 - smooth) * f / s.factor
        let b = smooth * f
        return a + b
    }
}

/// Position-dependent ops of decoder LMs.
public protocol PositionOps: AnyObject {
    /// Rotary position embedding, in place. `x` holds `positions.count` rows
    /// (tokens) of `ld` elements; element `c` of head `h` of token `t` is
    /// `x[t * ld + column + h * headDim + c]` for `h < heads`, `c < headDim`; no
    /// other element is read or written. So Q (`column: 0`) and K
    /// (`column: Hq * d`) rotate in place inside a packed `[tokens, (Hq + 2 Hkv) d]`
    /// QKV projection with `ld = (Hq + 2 Hkv) d`, no copies; V is untouched.
    /// `positions`: i32 `[tokens]`, each token's absolute position (so a batch of
    /// sequences, or decoding at an offset, is just its positions).
    ///
    /// For the pair `(a, b) = (x[i], x[i + d/2])`, angle `p * f_i`:
    /// `a' = a cos - b sin`, `b' = b cos + a sin` (Hugging Face's
    /// `x * cos + rotate_half(x) * sin`, the same float32 operation order, no
    /// fused multiply-add). `inverse: true` rotates by `-angle`: since the
    /// rotation is orthogonal this is the backward (`dX = R^T dY`, in place on
    /// the gradient), and it undoes the forward.
    ///
    /// Precision (issue 9 compares logits with transformers): the inverse
    /// frequencies `f_i` are `RotaryConfig.inverseFrequencies()` (transformers'
    /// float32 values), the angle is the float32 product `float(p) * f_i`
    /// (transformers' float32 matmul of one term), and cos / sin of that float32
    /// angle are taken in float64 and rounded: the correctly rounded values,
    /// within an ulp of torch's float32 `cos` / `sin`. Both backends compute them
    /// per call (CPU on the host, OpenCL on the device, float64 where the device
    /// has `cl_khr_fp64`, else float32 built-ins): nothing to upload or keep.
    func rotary(_ x: Tensor, heads: Int, ld: Int, column: Int, positions: Tensor,
                config: RotaryConfig, inverse: Bool) throws
}

extension PositionOps {
    /// `rotary` on packed rows: `x` is `[tokens, heads * headDim]`.
    public func rotary(_ x: Tensor, heads: Int, positions: Tensor, config: RotaryConfig, inverse: Bool) throws {
        try rotary(x, heads: heads, ld: heads * config.headDim, column: 0, positions: positions,
                   config: config, inverse: inverse)
    }
}

/// Argument checks shared by both backends.
enum RotaryCheck {
    /// Validates and returns the token count.
    static func check(_ x: Tensor, heads: Int, ld: Int, column: Int, positions: Tensor, config c: RotaryConfig) throws -> Int {
        try require(c.headDim > 0 && c.headDim % 2 == 0, "rotary: headDim must be even and positive, got \(c.headDim)")
        try require(c.theta > 0 && c.theta.isFinite, "rotary: theta must be positive, got \(c.theta)")
        if let s = c.scaling {
            try require(s.factor > 0 && s.lowFreqFactor > 0 && s.highFreqFactor > s.lowFreqFactor && s.originalMaxPositions > 0,
                        "rotary: bad Llama-3 scaling \(s) (needs factor > 0, 0 < lowFreqFactor < highFreqFactor, originalMaxPositions > 0)")
        }
        try require(heads >= 0 && column >= 0, "rotary: heads \(heads) and column \(column) must be non-negative")
        try require(ld >= column + heads * c.headDim, "rotary: row stride ld \(ld) < column \(column) + \(heads) heads x \(c.headDim)")
        try require(x.dtype == .f32, "rotary: x must be f32, got \(x.dtype)")
        try require(positions.dtype == .i32, "rotary: positions must be i32, got \(positions.dtype)")
        let tokens = positions.count
        let extent = tokens == 0 || heads == 0 ? 0 : (tokens - 1) * ld + column + heads * c.headDim
        try require(x.count >= extent, "rotary: x \(x.shape) too small for \(tokens) positions of row stride \(ld) (needs \(extent) elements)")
        try require(tokens == 0 || x.count <= tokens * ld,
                    "rotary: x \(x.shape) holds more than \(tokens) rows of \(ld): positions count mismatch")
        try require(x.offset + x.count < Int(Int32.max), "rotary: tensors over 2^31 elements are not supported")
        return tokens
    }
}
