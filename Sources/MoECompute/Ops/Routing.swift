/// Gating (softmax/top-k, jitter, capacity), expert choice, load-balancing and z-loss, hyperspherical routing (L2 normalise, cosine logits with temperature, soft dispatch/combine).
/// Both backends implement every requirement; tests compare them with float64 references.
///
/// Shapes: T tokens, E experts, k choices per token. Every op writes into
/// tensors the caller allocated (so a layer can reuse its buffers); the
/// extension below has allocating conveniences.
public protocol RoutingOps: AnyObject {
    /// Top-k token-choice gate. `logits [T,E]` f32 in; writes `expertIndex [T,k]` i32,
    /// `gateWeight [T,k]` f32 and `probs [T,E]` f32 (softmax over E of the
    /// jittered logits). Experts are chosen on the jittered logits, largest
    /// first, ties to the lower expert index.
    func gate(logits: Tensor, config: GateConfig, expertIndex: Tensor, gateWeight: Tensor, probs: Tensor) throws

    /// Gradient of the gate: `dGateWeight [T,k]` plus an optional `dProbs [T,E]`
    /// (e.g. from `loadBalancingLoss`) to `dLogits [T,E]` (overwritten), the
    /// gradient w.r.t. the logits given to `gate` (the jitter factor included).
    /// `expertIndex`, `gateWeight`, `probs` are the outputs of `gate` with the same config.
    func gateBackward(config: GateConfig, expertIndex: Tensor, gateWeight: Tensor, probs: Tensor,
                      dGateWeight: Tensor, dProbs: Tensor?, dLogits: Tensor) throws

    /// `probs = softmax(logits)` over E, row by row (the router probabilities expert choice starts from).
    func routerProbs(logits: Tensor, probs: Tensor) throws

    /// Switch load-balancing loss `aux = E * sum_e f_e * P_e` into `loss [1]`, with
    /// f_e the fraction of the T*k assignments in `expertIndex [T,k]` that chose e
    /// (before any capacity drop) and P_e the mean of `probs [T,E]` over tokens.
    /// When given, `dProbs [T,E]` is overwritten with `coefficient * d aux / d probs`
    /// (f_e held constant) = `coefficient * E * f_e / T`; pass it to `gateBackward`.
    func loadBalancingLoss(probs: Tensor, expertIndex: Tensor, coefficient: Float, loss: Tensor, dProbs: Tensor?) throws

    /// Router z-loss `z = mean_t logsumexp(logits_t)^2` into `loss [1]`. When given,
    /// `coefficient * dz/dlogits` is written to `dLogits [T,E]`, added to what it
    /// holds when `accumulate` is true.
    func zLoss(logits: Tensor, coefficient: Float, loss: Tensor, dLogits: Tensor?, accumulate: Bool) throws

    /// Expert choice: from `probs [T,E]`, each expert takes its `capacity` (C, at most T)
    /// tokens of highest probability, ties to the lower token index. Fills `plan`
    /// (made by `DispatchPlan.expertChoice`): `destination [T,E]` (row or -1),
    /// `counts [E]` = C, `offsets [E+1]` = e*C, `sourceOfRow [E*C]` = t*E + e with
    /// rows of an expert in token order; and `combineWeight [T,E]` = prob where chosen, else 0.
    func expertChoice(probs: Tensor, plan: DispatchPlan, combineWeight: Tensor) throws

    /// Gradient of expert choice w.r.t. the router logits, through `probs = softmax(logits)`:
    /// `dProbs = dCombineWeight` where chosen (destination >= 0), else 0, then the softmax backward.
    func expertChoiceBackward(probs: Tensor, destination: Tensor, dCombineWeight: Tensor, dLogits: Tensor) throws

    /// Row L2-normalisation `y = x / max(||x||, epsilon)` for `x [R,D]`.
    func l2NormalizeRows(_ x: Tensor, into y: Tensor, epsilon: Float) throws
    /// `dX` from `dY` for `l2NormalizeRows` (recomputes the norms from `x`).
    func l2NormalizeRowsBackward(x: Tensor, dY: Tensor, dX: Tensor, epsilon: Float) throws

    /// `logits = scores / tau`, where `temperature` is a device tensor [1] holding tau
    /// (a learnable parameter; no read-back). Scores are e.g. the cosine
    /// similarities `Xn Qn^T` from `gemm`.
    func scaleByTemperature(_ scores: Tensor, temperature: Tensor, into logits: Tensor) throws
    /// Backward of `scaleByTemperature`: `dScores = dLogits / tau` and
    /// `dTemperature[0] = -sum(dLogits * logits) / tau` (overwritten; deterministic reduction).
    func scaleByTemperatureBackward(dLogits: Tensor, logits: Tensor, temperature: Tensor,
                                    dScores: Tensor, dTemperature: Tensor) throws

    /// Soft-MoE dispatch weights: softmax down each column of `logits [T,S]` (over tokens).
    func softmaxOverTokens(_ logits: Tensor, into weights: Tensor) throws
    /// Backward of `softmaxOverTokens` from its output `weights` and `dWeights`.
    func softmaxOverTokensBackward(weights: Tensor, dWeights: Tensor, dLogits: Tensor) throws
    /// Soft-MoE combine weights: softmax along each row of `logits [T,S]` (over slots).
    func softmaxOverSlots(_ logits: Tensor, into weights: Tensor) throws
    /// Backward of `softmaxOverSlots` from its output `weights` and `dWeights`.
    func softmaxOverSlotsBackward(weights: Tensor, dWeights: Tensor, dLogits: Tensor) throws
}

/// How the k gate weights come from the router logits.
public enum GateMode: String, Sendable, CaseIterable {
    /// `probs = softmax(logits)` over E, take the k largest probabilities
    /// (optionally renormalised to sum 1).
    case softmaxThenTopK
    /// Take the k largest logits, softmax over those k (Mixtral). With k = 1 the
    /// weight is always 1 and the router gets no gradient through it.
    case topKThenSoftmax
}

/// Seeded multiplicative jitter on the router logits, as Switch Transformer
/// applies to the router input: `logit'[t,e] = logit[t,e] * m[t,e]` with
/// `m[t,e] = fma(epsilon, 2u - 1, 1)` (f32), uniform in [1 - epsilon, 1 + epsilon),
/// where `u = (h >> 8) / 2^24` and `h = GateJitter.hash(seed, t, e)` is a
/// counter-based 32-bit hash. Every step is exact or one IEEE rounding, so both
/// backends produce bit-identical noise. Gate outputs (selection, weights, probs)
/// are all computed from the jittered logits; `gateBackward` multiplies by `m`.
public struct GateJitter: Sendable, Equatable {
    public var epsilon: Float
    public var seed: UInt32
    public init(epsilon: Float, seed: UInt32) { self.epsilon = epsilon; self.seed = seed }

    /// lowbias32 (C. Wellons): a well-mixed bijection of 32-bit integers.
    @inline(__always)
    static func mix(_ v: UInt32) -> UInt32 {
        var x = v
        x ^= x >> 16; x = x &* 0x7feb_352d
        x ^= x >> 15; x = x &* 0x846c_a68b
        x ^= x >> 16
        return x
    }

    /// `mix(mix(mix(seed) + t) + e)` with wrapping arithmetic.
    public static func hash(seed: UInt32, token: Int, expert: Int) -> UInt32 {
        mix(mix(mix(seed) &+ UInt32(truncatingIfNeeded: token)) &+ UInt32(truncatingIfNeeded: expert))
    }

    /// The multiplicative factor for (token, expert), bit-identical to the kernels'.
    public func factor(token: Int, expert: Int) -> Float {
        let h = GateJitter.hash(seed: seed, token: token, expert: expert)
        let u = Float(h >> 8) * (1.0 / 16_777_216.0)
        return (1 as Float).addingProduct(epsilon, 2 * u - 1)
    }
}

public struct GateConfig: Sendable, Equatable {
    public var k: Int
    public var mode: GateMode
    /// Only for `softmaxThenTopK`: divide the k chosen probabilities by their sum.
    public var renormalize: Bool
    public var jitter: GateJitter?
    public init(k: Int, mode: GateMode = .softmaxThenTopK, renormalize: Bool = false, jitter: GateJitter? = nil) {
        self.k = k; self.mode = mode; self.renormalize = renormalize; self.jitter = jitter
    }
}

/// The three outputs of `gate`.
public struct GateOutput {
    public let expertIndex: Tensor   // [T,k] i32
    public let gateWeight: Tensor    // [T,k] f32
    public let probs: Tensor         // [T,E] f32
}

/// Expert-choice capacity: `min(T, ceil(T * factor / E))` tokens per expert.
public enum ExpertChoice {
    public static func capacity(tokens: Int, experts: Int, factor: Double) -> Int {
        guard tokens > 0, experts > 0 else { return 0 }
        return min(tokens, max(1, Int((Double(tokens) * factor / Double(experts)).rounded(.up))))
    }
}

extension RoutingOps where Self: Backend {
    /// `gate` into freshly allocated outputs; E is `logits.shape[1]`.
    public func gate(logits: Tensor, config: GateConfig) throws -> GateOutput {
        try require(logits.rank == 2, "gate: logits must be [T,E], got \(logits.shape)")
        let t = logits.shape[0], e = logits.shape[1]
        let out = GateOutput(expertIndex: try zeros([t, config.k], dtype: .i32), gateWeight: try zeros([t, config.k]),
                             probs: try zeros([t, e]))
        try gate(logits: logits, config: config, expertIndex: out.expertIndex, gateWeight: out.gateWeight, probs: out.probs)
        return out
    }

    public func gateBackward(config: GateConfig, gate out: GateOutput, dGateWeight: Tensor, dProbs: Tensor? = nil) throws -> Tensor {
        let dLogits = try zeros(out.probs.shape)
        try gateBackward(config: config, expertIndex: out.expertIndex, gateWeight: out.gateWeight, probs: out.probs,
                         dGateWeight: dGateWeight, dProbs: dProbs, dLogits: dLogits)
        return dLogits
    }

    /// Expert choice into a fresh plan and combine-weight tensor.
    public func expertChoice(probs: Tensor, capacity: Int) throws -> (plan: DispatchPlan, combineWeight: Tensor) {
        try require(probs.rank == 2, "expertChoice: probs must be [T,E], got \(probs.shape)")
        let plan = try DispatchPlan.expertChoice(on: self, tokens: probs.shape[0], experts: probs.shape[1], capacity: capacity)
        let w = try zeros(probs.shape)
        try expertChoice(probs: probs, plan: plan, combineWeight: w)
        return (plan, w)
    }
}

/// The forward values of `cosineLogits`, kept for its backward.
public struct CosineLogits {
    /// [T,D] tokens normalised to unit rows.
    public let xn: Tensor
    /// [S,D] queries (one per slot or expert) normalised to unit rows.
    public let qn: Tensor
    /// [T,S] `(xn qn^T) / tau`.
    public let logits: Tensor
}

extension RoutingOps where Self: Backend {
    /// Hyperspherical routing logits `L = normalize(x) normalize(q)^T / tau`
    /// (SpheroMoE / cosine routing): two row normalisations, one `gemm`, and
    /// `scaleByTemperature`. `x [T,D]`, `queries [S,D]`, `temperature [1]` on the device.
    public func cosineLogits(x: Tensor, queries: Tensor, temperature: Tensor, epsilon: Float = 1e-6) throws -> CosineLogits {
        try require(x.rank == 2 && queries.rank == 2 && x.shape[1] == queries.shape[1],
                    "cosineLogits: x \(x.shape) and queries \(queries.shape) must be [T,D] and [S,D]")
        let (t, d, s) = (x.shape[0], x.shape[1], queries.shape[0])
        let xn = try zeros([t, d]), qn = try zeros([s, d]), scores = try zeros([t, s])
        try l2NormalizeRows(x, into: xn, epsilon: epsilon)
        try l2NormalizeRows(queries, into: qn, epsilon: epsilon)
        try gemm(Gemm(m: t, n: s, k: d, transB: true), xn, qn, scores)
        let logits = try zeros([t, s])
        try scaleByTemperature(scores, temperature: temperature, into: logits)
        return CosineLogits(xn: xn, qn: qn, logits: logits)
    }

    /// Gradients of `cosineLogits` w.r.t. x, the queries and the temperature, from `dLogits [T,S]`.
    public func cosineLogitsBackward(x: Tensor, queries: Tensor, temperature: Tensor, forward f: CosineLogits,
                                     dLogits: Tensor, epsilon: Float = 1e-6) throws -> (dX: Tensor, dQueries: Tensor, dTemperature: Tensor) {
        let (t, d, s) = (x.shape[0], x.shape[1], queries.shape[0])
        let dScores = try zeros([t, s]), dTemperature = try zeros([1])
        try scaleByTemperatureBackward(dLogits: dLogits, logits: f.logits, temperature: temperature,
                                       dScores: dScores, dTemperature: dTemperature)
        // scores = xn qn^T: dxn = dScores qn, dqn = dScores^T xn.
        let dxn = try zeros([t, d]), dqn = try zeros([s, d])
        try gemm(Gemm(m: t, n: d, k: s), dScores, f.qn, dxn)
        try gemm(Gemm(m: s, n: d, k: t, transA: true), dScores, f.xn, dqn)
        let dX = try zeros([t, d]), dQ = try zeros([s, d])
        try l2NormalizeRowsBackward(x: x, dY: dxn, dX: dX, epsilon: epsilon)
        try l2NormalizeRowsBackward(x: queries, dY: dqn, dX: dQ, epsilon: epsilon)
        return (dX, dQ, dTemperature)
    }
}

/// Shape checks shared by both backends.
enum RoutingCheck {
    static func matrix(_ t: Tensor, _ dtype: DType, _ what: String) throws -> (Int, Int) {
        try require(t.rank == 2 && t.dtype == dtype, "\(what) must be a 2-D \(dtype) tensor, got \(t.shape) \(t.dtype)")
        return (t.shape[0], t.shape[1])
    }

    static func shape(_ t: Tensor, _ shape: [Int], _ dtype: DType, _ what: String) throws {
        try require(t.shape == shape && t.dtype == dtype, "\(what) must be \(shape) \(dtype), got \(t.shape) \(t.dtype)")
    }

    /// (T, E) of a gate call, with every tensor checked.
    static func gate(_ logits: Tensor, _ c: GateConfig, _ idx: Tensor, _ w: Tensor, _ probs: Tensor) throws -> (Int, Int) {
        let (t, e) = try matrix(logits, .f32, "gate logits")
        try require(e >= 1, "gate: need at least one expert")
        try require(c.k >= 1 && c.k <= e, "gate: k = \(c.k) must be in 1...\(e)")
        try shape(idx, [t, c.k], .i32, "gate expertIndex")
        try shape(w, [t, c.k], .f32, "gate gateWeight")
        try shape(probs, [t, e], .f32, "gate probs")
        return (t, e)
    }

    static func gateBackward(_ c: GateConfig, _ idx: Tensor, _ w: Tensor, _ probs: Tensor, _ dw: Tensor,
                             _ dProbs: Tensor?, _ dLogits: Tensor) throws -> (Int, Int) {
        let (t, e) = try matrix(probs, .f32, "gateBackward probs")
        try require(c.k >= 1 && c.k <= e, "gateBackward: k = \(c.k) must be in 1...\(e)")
        try shape(idx, [t, c.k], .i32, "gateBackward expertIndex")
        try shape(w, [t, c.k], .f32, "gateBackward gateWeight")
        try shape(dw, [t, c.k], .f32, "gateBackward dGateWeight")
        if let dProbs { try shape(dProbs, [t, e], .f32, "gateBackward dProbs") }
        try shape(dLogits, [t, e], .f32, "gateBackward dLogits")
        return (t, e)
    }

    /// (T, E, C) of an expert-choice call, with the plan and weights checked.
    static func expertChoice(_ probs: Tensor, _ plan: DispatchPlan, _ combineWeight: Tensor, on backend: Backend) throws -> (Int, Int, Int) {
        let (T, E) = try matrix(probs, .f32, "expertChoice probs")
        try plan.validate(on: backend)
        try require(plan.destination.shape == [T, E] && plan.experts == E && plan.capacity != nil,
                    "expertChoice: plan (destination \(plan.destination.shape)) was not made for probs \(probs.shape)")
        try shape(combineWeight, [T, E], .f32, "expertChoice combineWeight")
        return (T, E, min(plan.capacity!, T))
    }

    static func sameShape(_ op: String, _ tensors: Tensor...) throws {
        for t in tensors {
            try require(t.dtype == .f32 && t.shape == tensors[0].shape, "\(op): tensors must be f32 of one shape, got \(tensors.map(\.shape))")
        }
        try require(tensors[0].rank == 2, "\(op): tensors must be 2-D, got \(tensors[0].shape)")
    }

    static func scalar(_ t: Tensor, _ what: String) throws {
        try require(t.dtype == .f32 && t.count == 1, "\(what) must be a one-element f32 tensor, got \(t.shape)")
    }
}
