import Foundation

/// AdamW step, global gradient norm and clipping.
/// Both backends implement every requirement; tests compare them with float64 references.
///
/// Every op takes a list of tensors and launches one pass per tensor; a caller
/// that keeps all parameters (or all gradients) in one buffer can pass a few
/// large views instead (one per weight-decay group) to save launches.
public protocol OptimOps: AnyObject {
    /// One AdamW step (decoupled weight decay, as `torch.optim.AdamW`) at step
    /// number `step` (1 for the first step), for each tensor group:
    /// ```
    /// p -= lr * weightDecay * p
    /// m  = beta1 * m + (1 - beta1) * g
    /// v  = beta2 * v + (1 - beta2) * g^2
    /// p -= lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
    /// ```
    /// With `guardNorm` (a `[1]` tensor on the device, the step's gradient norm),
    /// a NaN or infinite norm skips the whole update on the device: parameters
    /// and moments keep their values without a host round trip.
    func adamWStep(_ groups: [AdamWTensors], config: AdamWConfig, step: Int, guardNorm: Tensor?) throws

    /// `norm[0] = sqrt(sum over every element of every tensor of x^2)`, a
    /// deterministic two-pass reduction that stays on the device (`norm: [1]`).
    func globalNorm(_ tensors: [Tensor], into norm: Tensor) throws

    /// Multiplies every tensor by `min(1, maxNorm / norm[0])`, reading `norm` on
    /// the device (no host sync). A zero, NaN or infinite norm leaves the tensors
    /// unchanged, so the caller can see it in the norm and skip the step.
    func clipByNorm(_ tensors: [Tensor], maxNorm: Float, norm: Tensor) throws
}

/// AdamW hyper-parameters shared by every group of one step.
public struct AdamWConfig: Sendable, Equatable {
    public var learningRate: Float
    public var beta1: Float
    public var beta2: Float
    public var eps: Float

    public init(learningRate: Float, beta1: Float = 0.9, beta2: Float = 0.999, eps: Float = 1e-8) {
        self.learningRate = learningRate; self.beta1 = beta1; self.beta2 = beta2; self.eps = eps
    }

    /// `(1 / (1 - beta1^step), 1 / (1 - beta2^step))`, computed in float64 on the host.
    func biasCorrections(step: Int) -> (Float, Float) {
        let c1 = 1 / (1 - Foundation.pow(Double(beta1), Double(step)))
        let c2 = 1 / (1 - Foundation.pow(Double(beta2), Double(step)))
        return (Float(c1), Float(c2))
    }
}

/// One parameter tensor with its gradient and AdamW moments (all the same element
/// count, f32), and the weight decay to apply to it (0 for norms, biases, temperatures).
/// A flat parameter range holds its decayed parameters first: `decayedCount`
/// elements get `weightDecay`, the rest none (nil: all of them), so one launch
/// updates a whole range.
public struct AdamWTensors {
    public var param: Tensor, grad: Tensor, m: Tensor, v: Tensor
    public var weightDecay: Float
    public var decayedCount: Int?

    public init(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, weightDecay: Float, decayedCount: Int? = nil) {
        self.param = param; self.grad = grad; self.m = m; self.v = v; self.weightDecay = weightDecay
        self.decayedCount = decayedCount
    }

    /// Elements that get weight decay.
    var decayed: Int { min(decayedCount ?? param.count, param.count) }

    func validate() throws {
        for t in [param, grad, m, v] {
            try require(t.dtype == .f32, "adamWStep takes f32 tensors, got \(t.dtype)")
            try require(t.count == param.count, "adamWStep: param \(param.shape), grad \(grad.shape), m \(m.shape), v \(v.shape) differ in size")
        }
        try require(param.count + param.offset < Int(Int32.max), "adamWStep: tensors over 2^31 elements are not supported")
    }
}

extension Backend {
    public func adamWStep(_ groups: [AdamWTensors], config: AdamWConfig, step: Int) throws {
        try adamWStep(groups, config: config, step: step, guardNorm: nil)
    }

    /// The global L2 norm of `tensors`, read back to the host (one sync).
    public func globalNorm(_ tensors: [Tensor]) throws -> Float {
        let norm = try zeros([1])
        try globalNorm(tensors, into: norm)
        return try norm.floats()[0]
    }

    /// Computes the global norm, scales the gradients by `min(1, maxNorm / norm)`
    /// and returns the norm before clipping (one host sync).
    @discardableResult
    public func clipGradients(_ grads: [Tensor], maxNorm: Float) throws -> Float {
        let norm = try zeros([1])
        try globalNorm(grads, into: norm)
        try clipByNorm(grads, maxNorm: maxNorm, norm: norm)
        return try norm.floats()[0]
    }

    /// Sets every tensor to 0.
    public func zeroGradients(_ grads: [Tensor]) throws {
        for g in grads { try fill(g, value: 0) }
    }
}

enum OptimCheck {
    static func tensors(_ op: String, _ ts: [Tensor]) throws {
        for t in ts {
            try require(t.dtype == .f32, "\(op) takes f32 tensors, got \(t.dtype) \(t.shape)")
            try require(t.count + t.offset < Int(Int32.max), "\(op): tensors over 2^31 elements are not supported")
        }
    }

    /// The clip factor both backends use: `min(1, maxNorm / norm)`; 1 for a zero or non-finite norm.
    static func clipFactor(norm: Float, maxNorm: Float) -> Float {
        guard norm.isFinite, norm > 0 else { return 1 }
        return min(1, maxNorm / norm)
    }
}
