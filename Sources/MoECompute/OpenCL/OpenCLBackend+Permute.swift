import Foundation

/// Dispatch plans, permute and combine as kernels from Kernels/permute.cl.
/// The plan is built without any host read-back: offsets stay on the device
/// and the row kernels read offsets[E] themselves.
extension OpenCLBackend: PermuteOps {
    private func i(_ v: Int) -> CLArg { .int(Int32(v)) }

    public func dispatchPlan(expertIndex: Tensor, gateWeight: Tensor?, config: DispatchConfig, into plan: DispatchPlan) throws {
        try PermuteCheck.plan(expertIndex, gateWeight, config, plan, self)
        let n = expertIndex.count, E = config.experts
        let G = routingGroup
        let chunks = max(1, (n + G - 1) / G)
        let cap = plan.capacity ?? Int(Int32.max)
        let chunkCounts = try scratchTensor("chunkCounts", chunks * E, dtype: .i32)
        // Drop policy "probs": decide per expert which assignments survive first,
        // then sort only those (their positions are then all below the capacity).
        var keepArgs: [CLArg] = try arg(expertIndex) + [i(0)]
        if config.dropPolicy == .probs, let c = plan.capacity, let gateWeight {
            let keep = try scratchTensor("keep", max(n, 1), dtype: .i32)
            try keepByWeight(expertIndex: expertIndex, gateWeight: gateWeight, experts: E, capacity: c, keep: keep)
            keepArgs = try arg(keep) + [i(1)]
        }
        let cc: CLArg = .buffer(try buffer(chunkCounts))
        try kernel("plan_chunk_counts", in: "permute.cl").launch(
            try arg(expertIndex) + keepArgs + [i(n), i(E), cc], global: [chunks * G], local: [G])
        try kernel("plan_offsets", in: "permute.cl").launch(
            [cc, i(chunks), i(E), i(cap)] + (try arg(plan.counts)) + arg(plan.offsets), global: [G], local: [G])
        try kernel("plan_scatter", in: "permute.cl").launch(
            try arg(expertIndex) + keepArgs + [i(n), i(E), i(cap), cc] + arg(plan.offsets)
                + arg(plan.destination) + arg(plan.sourceOfRow),
            global: [chunks * G], local: [G])
        try launch1D("plan_tail", in: "permute.cl",
                     try arg(plan.offsets) + [i(E)] + arg(plan.sourceOfRow) + [i(plan.sourceOfRow.count)],
                     count: plan.sourceOfRow.count)
    }

    /// (L, RB) work-groups for the row kernels: L work-items across a row in
    /// float4 steps, RB rows per group.
    private func launchRows(_ name: String, _ args: [CLArg], rows: Int, hidden h: Int) throws {
        let G = routingGroup
        // GPUs: a row per 64 work-items, coalesced. CPU devices (PoCL runs a group as
        // loops on one core): a row per work-item and 32 rows per group measured
        // 2-5x faster than the GPU shape on the development machine.
        // (`workGroupOverride` forces the GPU shape, so CI runs it on its CPU device.)
        let l = cpuShapes ? 1 : min(64, max(1, (h + 3) / 4), G)
        let rb = cpuShapes ? min(32, G) : max(1, G / l)
        try kernel(name, in: "permute.cl").launch(args, global: [l, rows], local: [l, rb])
    }

    public func permute(_ x: Tensor, plan: DispatchPlan, into xp: Tensor) throws {
        let (h, rows) = try PermuteCheck.rows("permute", tokenRows: x, permutedRows: xp, plan, self)
        try launchRows("permute_rows",
                       try arg(x) + arg(plan.sourceOfRow) + arg(plan.offsets) + [i(plan.experts)] + arg(xp)
                        + [i(rows), i(h), i(plan.slotsPerToken)],
                       rows: rows, hidden: h)
    }

    public func unpermute(_ dXp: Tensor, plan: DispatchPlan, into dX: Tensor) throws {
        let (h, _) = try PermuteCheck.rows("unpermute", tokenRows: dX, permutedRows: dXp, plan, self)
        try launchRows("gather_rows",
                       try arg(dXp) + arg(plan.destination) + arg(dXp) + [i(0)] + arg(dX)
                        + [i(plan.tokens), i(h), i(plan.slotsPerToken)],
                       rows: plan.tokens, hidden: h)
    }

    public func combine(_ yp: Tensor, weights: Tensor, plan: DispatchPlan, into out: Tensor) throws {
        let (h, _) = try PermuteCheck.rows("combine", tokenRows: out, permutedRows: yp, plan, self)
        try PermuteCheck.weights("combine", weights, plan)
        try launchRows("gather_rows",
                       try arg(yp) + arg(plan.destination) + arg(weights) + [i(1)] + arg(out)
                        + [i(plan.tokens), i(h), i(plan.slotsPerToken)],
                       rows: plan.tokens, hidden: h)
    }

    public func combineBackward(dOut: Tensor, yp: Tensor, weights: Tensor, plan: DispatchPlan, dYp: Tensor, dWeights: Tensor) throws {
        let (h, rows) = try PermuteCheck.rows("combineBackward", tokenRows: dOut, permutedRows: yp, plan, self)
        try PermuteCheck.weights("combineBackward weights", weights, plan)
        try PermuteCheck.weights("combineBackward dWeights", dWeights, plan)
        try require(dYp.shape == yp.shape && dYp.dtype == .f32, "combineBackward: dYp must be \(yp.shape) f32")
        // Weights first, so dYp may share storage with yp.
        let n = plan.tokens * plan.slotsPerToken
        try launch1D("combine_backward_weights", in: "permute.cl",
                     try arg(dOut) + arg(yp) + arg(plan.destination) + arg(dWeights) + [i(n), i(h), i(plan.slotsPerToken)],
                     count: n)
        try launchRows("combine_backward_rows",
                       try arg(dOut) + arg(plan.sourceOfRow) + arg(weights) + arg(plan.offsets) + [i(plan.experts)]
                        + arg(dYp) + [i(rows), i(h), i(plan.slotsPerToken)],
                       rows: rows, hidden: h)
    }
}
