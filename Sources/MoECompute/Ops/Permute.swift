/// Histogram, offsets, stable scatter indices, permute rows into expert-contiguous order, gather-form weighted combine, and their gradients.
/// Both backends implement every requirement; tests compare them with float64 references.
///
/// T tokens, E experts, S slots per token (S = k for top-k, S = E for expert
/// choice); assignment i = t*S + j is token t = i/S, slot j = i%S.
public protocol PermuteOps: AnyObject {
    /// Builds the dispatch plan of top-k routing from `expertIndex [T,k]` into
    /// `plan` (made by `DispatchPlan.topK`): a stable counting sort by expert,
    /// rows of an expert in token order, assignments past the capacity dropped
    /// (`destination` -1). `gateWeight [T,k]` is required by `DropPolicy.probs`.
    /// Indices outside 0..<E are treated as dropped. Offsets stay on the device.
    func dispatchPlan(expertIndex: Tensor, gateWeight: Tensor?, config: DispatchConfig, into plan: DispatchPlan) throws

    /// `xp[r] = x[sourceOfRow[r] / S]` for `r < offsets[E]`, zero for the rows
    /// after. `x [T,H]`, `xp [R,H]` with R >= `plan.maxRows`.
    func permute(_ x: Tensor, plan: DispatchPlan, into xp: Tensor) throws

    /// Backward of `permute` (gather form, no atomics):
    /// `dX[t] = sum_j dXp[destination[t,j]]` over slots j in order, skipping -1.
    func unpermute(_ dXp: Tensor, plan: DispatchPlan, into dX: Tensor) throws

    /// Gather-form weighted combine: `out[t] = sum_j weights[t,j] * yp[destination[t,j]]`
    /// over j in order, skipping -1. `weights [T,S]` (gate weights or expert-choice combine weights).
    func combine(_ yp: Tensor, weights: Tensor, plan: DispatchPlan, into out: Tensor) throws

    /// Backward of `combine`: `dYp[r] = weights[t,j] * dOut[t]` for the (t,j) owning row r
    /// (zero for rows past `offsets[E]`), and `dWeights[t,j] = dot(dOut[t], yp[destination[t,j]])`
    /// (0 where dropped). Both overwritten.
    func combineBackward(dOut: Tensor, yp: Tensor, weights: Tensor, plan: DispatchPlan, dYp: Tensor, dWeights: Tensor) throws
}

/// Which assignments an expert keeps when more than its capacity choose it.
public enum DropPolicy: String, Sendable, CaseIterable {
    /// The earliest tokens (lowest assignment index) are kept.
    case position
    /// The assignments with the highest gate weight are kept, ties to the earlier
    /// assignment; kept rows still follow token order.
    case probs
}

public enum Capacity: Sendable, Equatable {
    /// Every assignment is kept.
    case dropless
    /// `ceil(T*k/E * factor)` assignments per expert (evaluated in float64, as
    /// Megatron and Switch compute it).
    case factor(Double)
    /// A fixed number of assignments per expert.
    case fixed(Int)

    /// Rows per expert for T tokens and k choices among E experts (nil: unbounded).
    public func perExpert(tokens: Int, k: Int, experts: Int) -> Int? {
        switch self {
        case .dropless: return nil
        case .factor(let f): return max(0, Int((Double(tokens * k) / Double(experts) * f).rounded(.up)))
        case .fixed(let c): return max(0, c)
        }
    }
}

public struct DispatchConfig: Sendable, Equatable {
    public var experts: Int
    public var capacity: Capacity
    public var dropPolicy: DropPolicy
    public init(experts: Int, capacity: Capacity = .dropless, dropPolicy: DropPolicy = .position) {
        self.experts = experts; self.capacity = capacity; self.dropPolicy = dropPolicy
    }
}

/// Where each assignment goes in the expert-contiguous (permuted) buffer.
/// All tensors live on the backend that made the plan.
public struct DispatchPlan {
    /// [E] i32: rows kept per expert.
    public let counts: Tensor
    /// [E+1] i32: exclusive scan of `counts`; expert e owns rows offsets[e]..<offsets[e+1] (not padded).
    public let offsets: Tensor
    /// [T,S] i32: row of assignment (t,j), or -1 when dropped / not chosen.
    public let destination: Tensor
    /// [R] i32: for r < offsets[E], the assignment t*S + j feeding row r; -1 after.
    public let sourceOfRow: Tensor
    /// Per-expert row limit the plan was built with (nil: dropless).
    public let capacity: Int?

    public var tokens: Int { destination.shape[0] }
    public var slotsPerToken: Int { destination.shape[1] }
    public var experts: Int { counts.count }
    /// The most rows the plan can fill: min(T*S, E*capacity). A permuted buffer needs at least this many.
    public var maxRows: Int {
        let n = tokens * slotsPerToken
        guard let c = capacity else { return n }
        return min(n, experts * c)
    }

    public init(counts: Tensor, offsets: Tensor, destination: Tensor, sourceOfRow: Tensor, capacity: Int?) {
        self.counts = counts; self.offsets = offsets; self.destination = destination
        self.sourceOfRow = sourceOfRow; self.capacity = capacity
    }

    /// Zeroed plan tensors for top-k routing of T tokens with k choices.
    public static func topK(on backend: Backend, tokens: Int, k: Int, config: DispatchConfig) throws -> DispatchPlan {
        try require(tokens >= 0 && k >= 1 && config.experts >= 1, "plan: need tokens >= 0, k >= 1, experts >= 1")
        return DispatchPlan(counts: try backend.zeros([config.experts], dtype: .i32),
                            offsets: try backend.zeros([config.experts + 1], dtype: .i32),
                            destination: try backend.zeros([tokens, k], dtype: .i32),
                            sourceOfRow: try backend.zeros([tokens * k], dtype: .i32),
                            capacity: config.capacity.perExpert(tokens: tokens, k: k, experts: config.experts))
    }

    /// Zeroed plan tensors for expert choice: S = E slots per token, `min(capacity, T)` rows per expert.
    public static func expertChoice(on backend: Backend, tokens: Int, experts: Int, capacity: Int) throws -> DispatchPlan {
        try require(tokens >= 0 && experts >= 1 && capacity >= 0, "expert-choice plan: need tokens >= 0, experts >= 1, capacity >= 0")
        let c = min(capacity, tokens)
        return DispatchPlan(counts: try backend.zeros([experts], dtype: .i32),
                            offsets: try backend.zeros([experts + 1], dtype: .i32),
                            destination: try backend.zeros([tokens, experts], dtype: .i32),
                            sourceOfRow: try backend.zeros([experts * c], dtype: .i32),
                            capacity: c)
    }

    /// Same backend and consistent shapes.
    func validate(on backend: Backend) throws {
        for t in [counts, offsets, destination, sourceOfRow] {
            try require(t.backend === backend && t.dtype == .i32, "dispatch plan tensors must be i32 on \(backend.name)")
        }
        try require(destination.rank == 2 && offsets.count == experts + 1 && experts >= 1,
                    "dispatch plan: destination \(destination.shape), counts \(counts.shape), offsets \(offsets.shape) disagree")
        try require(sourceOfRow.count >= maxRows, "dispatch plan: sourceOfRow \(sourceOfRow.shape) holds fewer than \(maxRows) rows")
    }
}

extension PermuteOps where Self: Backend {
    /// `dispatchPlan` into a freshly allocated plan; T and k come from `expertIndex [T,k]`.
    public func dispatchPlan(expertIndex: Tensor, gateWeight: Tensor? = nil, config: DispatchConfig) throws -> DispatchPlan {
        try require(expertIndex.rank == 2, "dispatchPlan: expertIndex must be [T,k], got \(expertIndex.shape)")
        let plan = try DispatchPlan.topK(on: self, tokens: expertIndex.shape[0], k: expertIndex.shape[1], config: config)
        try dispatchPlan(expertIndex: expertIndex, gateWeight: gateWeight, config: config, into: plan)
        return plan
    }
}

/// Shape checks shared by both backends; each returns (T, S, E, H, R).
enum PermuteCheck {
    static func plan(_ expertIndex: Tensor, _ gateWeight: Tensor?, _ config: DispatchConfig, _ plan: DispatchPlan,
                     _ backend: Backend) throws {
        try require(expertIndex.rank == 2 && expertIndex.dtype == .i32, "dispatchPlan: expertIndex must be [T,k] i32")
        try plan.validate(on: backend)
        try require(plan.destination.shape == expertIndex.shape && plan.experts == config.experts,
                    "dispatchPlan: plan \(plan.destination.shape) x \(plan.experts) experts does not match \(expertIndex.shape) x \(config.experts)")
        try require(plan.capacity == config.capacity.perExpert(tokens: expertIndex.shape[0], k: expertIndex.shape[1], experts: config.experts),
                    "dispatchPlan: plan was made for another capacity")
        if config.dropPolicy == .probs && plan.capacity != nil {
            guard let w = gateWeight else { throw ShapeError("dispatchPlan: drop policy probs needs gateWeight") }
            try require(w.shape == expertIndex.shape && w.dtype == .f32, "dispatchPlan: gateWeight must be \(expertIndex.shape) f32")
        }
    }

    /// x [T,H] and xp [R,H], R >= maxRows.
    static func rows(_ op: String, tokenRows x: Tensor, permutedRows xp: Tensor, _ plan: DispatchPlan, _ backend: Backend) throws -> (h: Int, r: Int) {
        try plan.validate(on: backend)
        try require(x.rank == 2 && xp.rank == 2 && x.dtype == .f32 && xp.dtype == .f32, "\(op): rows must be 2-D f32, got \(x.shape), \(xp.shape)")
        try require(x.shape[0] == plan.tokens && xp.shape[1] == x.shape[1], "\(op): token rows \(x.shape) and permuted rows \(xp.shape) disagree with \(plan.tokens) tokens")
        try require(xp.shape[0] >= plan.maxRows, "\(op): permuted buffer \(xp.shape) has fewer than \(plan.maxRows) rows")
        return (x.shape[1], xp.shape[0])
    }

    static func weights(_ op: String, _ w: Tensor, _ plan: DispatchPlan) throws {
        try require(w.dtype == .f32 && w.shape == plan.destination.shape, "\(op): weights must be \(plan.destination.shape) f32, got \(w.shape)")
    }
}
