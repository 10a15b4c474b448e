import Foundation

/// Routing ops as kernels from Kernels/routing.cl. Nothing is read back to the
/// host: reductions finish on the device and scalars (temperature, losses)
/// stay in one-element tensors.
extension OpenCLBackend: RoutingOps {
    /// Work-group size for the group-wide reductions, scans and plan chunks
    /// (<= GROUP_MAX = 256 in the kernels); `workGroupOverride` lets tests try others.
    var routingGroup: Int { min(Self.workGroupOverride ?? 256, tuning.elementwiseGroup) }

    private func i(_ v: Int) -> CLArg { .int(Int32(v)) }

    private func jitterArgs(_ c: GateConfig) -> [CLArg] {
        guard let j = c.jitter else { return [.int(0), .int(0), .float(0)] }
        return [.int(1), .int(Int32(bitPattern: j.seed)), .float(j.epsilon)]
    }

    public func gate(logits: Tensor, config c: GateConfig, expertIndex: Tensor, gateWeight: Tensor, probs: Tensor) throws {
        let (T, E) = try RoutingCheck.gate(logits, c, expertIndex, gateWeight, probs)
        let args: [CLArg] = try arg(logits) + [i(T), i(E), i(c.k), i(c.mode == .softmaxThenTopK ? 0 : 1), i(c.renormalize ? 1 : 0)]
            + jitterArgs(c) + arg(expertIndex) + arg(gateWeight) + arg(probs)
        try launch1D("gate_topk", in: "routing.cl", args, count: T)
    }

    public func gateBackward(config c: GateConfig, expertIndex: Tensor, gateWeight: Tensor, probs: Tensor,
                             dGateWeight: Tensor, dProbs: Tensor?, dLogits: Tensor) throws {
        let (T, E) = try RoutingCheck.gateBackward(c, expertIndex, gateWeight, probs, dGateWeight, dProbs, dLogits)
        let args: [CLArg] = try [i(T), i(E), i(c.k), i(c.mode == .softmaxThenTopK ? 0 : 1), i(c.renormalize ? 1 : 0)]
            + jitterArgs(c) + arg(expertIndex) + arg(gateWeight) + arg(probs) + arg(dGateWeight)
            + arg(dProbs ?? probs) + [i(dProbs == nil ? 0 : 1)] + arg(dLogits)
        try launch1D("gate_backward", in: "routing.cl", args, count: T)
    }

    public func routerProbs(logits: Tensor, probs: Tensor) throws {
        try RoutingCheck.sameShape("routerProbs", logits, probs)
        try launch1D("softmax_rows", in: "routing.cl", try arg(logits) + arg(probs) + [i(logits.shape[0]), i(logits.shape[1])],
                     count: logits.shape[0])
    }

    /// `out[0] = scale * sum(a .* b)` (or `-sum / tau[0]`), in a fixed order: per-chunk
    /// work-group trees, then one work-group over the partial sums.
    private func deterministicSum(_ a: Tensor, times b: Tensor?, count n: Int, scale: Float,
                                  divideByMinus tau: Tensor?, into out: Tensor) throws {
        let G = routingGroup
        let chunk = G * 16
        let groups = max(1, (n + chunk - 1) / chunk)
        let partial = try scratchTensor("dotPartials", groups)
        try kernel("dot_partials", in: "routing.cl").launch(
            try arg(a) + arg(b ?? a) + [i(b == nil ? 0 : 1), i(n), i(chunk)] + arg(partial),
            global: [groups * G], local: [G])
        try kernel("sum_final", in: "routing.cl").launch(
            try arg(partial) + [i(groups), .float(scale)] + arg(tau ?? partial) + [i(tau == nil ? 0 : 1)] + arg(out),
            global: [G], local: [G])
    }

    public func loadBalancingLoss(probs: Tensor, expertIndex: Tensor, coefficient: Float, loss: Tensor, dProbs: Tensor?) throws {
        let (T, E) = try RoutingCheck.matrix(probs, .f32, "loadBalancingLoss probs")
        let (Ti, k) = try RoutingCheck.matrix(expertIndex, .i32, "loadBalancingLoss expertIndex")
        try require(Ti == T && k >= 1, "loadBalancingLoss: expertIndex \(expertIndex.shape) does not match probs \(probs.shape)")
        try RoutingCheck.scalar(loss, "loadBalancingLoss loss")
        if let dProbs { try RoutingCheck.shape(dProbs, [T, E], .f32, "loadBalancingLoss dProbs") }
        guard T > 0 else {
            try fill(loss, value: 0)
            return
        }
        let chunk = 256
        let chunks = (T + chunk - 1) / chunk
        let psum = try scratchTensor("lbSum", chunks * E)
        let pcount = try scratchTensor("lbCount", chunks * E, dtype: .i32)
        let gradE = try scratchTensor("lbGrad", E)
        try kernel("lb_partials", in: "routing.cl").launch(
            try arg(probs) + arg(expertIndex) + [i(T), i(E), i(k), i(chunk), .buffer(try buffer(psum)), .buffer(try buffer(pcount))],
            global: [E, chunks])
        try kernel("lb_final", in: "routing.cl").launch(
            [.buffer(try buffer(psum)), .buffer(try buffer(pcount)), i(chunks), i(T), i(E), i(k), .float(coefficient)]
                + (try arg(loss)) + [.buffer(try buffer(gradE))],
            global: [1], local: [1])
        if let dProbs {
            try launch1D("lb_grad", in: "routing.cl", [.buffer(try buffer(gradE)), i(T), i(E)] + (try arg(dProbs)), count: T * E)
        }
    }

    public func zLoss(logits: Tensor, coefficient: Float, loss: Tensor, dLogits: Tensor?, accumulate: Bool) throws {
        let (T, E) = try RoutingCheck.matrix(logits, .f32, "zLoss logits")
        try RoutingCheck.scalar(loss, "zLoss loss")
        if let dLogits { try RoutingCheck.shape(dLogits, [T, E], .f32, "zLoss dLogits") }
        guard T > 0 else {
            try fill(loss, value: 0)
            return
        }
        let sq = try scratchTensor("zSquares", T)
        try launch1D("zloss_rows", in: "routing.cl",
                     try arg(logits) + [i(T), i(E)] + arg(sq) + [i(dLogits == nil ? 0 : 1), i(accumulate ? 1 : 0), .float(coefficient)]
                        + arg(dLogits ?? sq),
                     count: T)
        try deterministicSum(sq, times: nil, count: T, scale: 1 / Float(T), divideByMinus: nil, into: loss)
    }

    public func expertChoice(probs: Tensor, plan: DispatchPlan, combineWeight: Tensor) throws {
        let (T, E, C) = try RoutingCheck.expertChoice(probs, plan, combineWeight, on: self)
        let G = routingGroup
        let dummy = try arg(plan.counts)
        try kernel("select_top_c", in: "routing.cl").launch(
            [i(0), i(T), i(E), i(C)] + (try arg(probs)) + dummy + arg(plan.destination) + arg(combineWeight)
                + arg(plan.sourceOfRow) + arg(plan.counts) + arg(plan.offsets) + dummy,
            global: [E * G], local: [G])
        if plan.sourceOfRow.count > E * C {
            // Rows past E*C (a plan buffer larger than needed) have no source.
            try launch1D("plan_tail", in: "permute.cl", try arg(plan.offsets) + [i(E)] + arg(plan.sourceOfRow) + [i(plan.sourceOfRow.count)],
                         count: plan.sourceOfRow.count)
        }
    }

    /// Drop policy "probs": keep[i] = 1 for the `capacity` assignments of each
    /// expert with the largest gate weight (ties to the earlier assignment).
    func keepByWeight(expertIndex: Tensor, gateWeight: Tensor, experts E: Int, capacity C: Int, keep: Tensor) throws {
        let G = routingGroup
        let dummy = try arg(keep)
        try kernel("select_top_c", in: "routing.cl").launch(
            [i(1), i(expertIndex.count), i(E), i(C)] + (try arg(gateWeight)) + arg(expertIndex)
                + dummy + arg(gateWeight) + dummy + dummy + dummy + arg(keep),
            global: [E * G], local: [G])
    }

    public func expertChoiceBackward(probs: Tensor, destination: Tensor, dCombineWeight: Tensor, dLogits: Tensor) throws {
        try RoutingCheck.sameShape("expertChoiceBackward", probs, dCombineWeight, dLogits)
        try RoutingCheck.shape(destination, probs.shape, .i32, "expertChoiceBackward destination")
        try launch1D("softmax_rows_backward", in: "routing.cl",
                     try arg(probs) + arg(dCombineWeight) + arg(destination) + [i(1)] + arg(dLogits) + [i(probs.shape[0]), i(probs.shape[1])],
                     count: probs.shape[0])
    }

    public func l2NormalizeRows(_ x: Tensor, into y: Tensor, epsilon: Float) throws {
        try RoutingCheck.sameShape("l2NormalizeRows", x, y)
        try launch1D("l2norm_rows", in: "routing.cl", try arg(x) + arg(y) + [i(x.shape[0]), i(x.shape[1]), .float(epsilon)],
                     count: x.shape[0])
    }

    public func l2NormalizeRowsBackward(x: Tensor, dY: Tensor, dX: Tensor, epsilon: Float) throws {
        try RoutingCheck.sameShape("l2NormalizeRowsBackward", x, dY, dX)
        try launch1D("l2norm_rows_backward", in: "routing.cl",
                     try arg(x) + arg(dY) + arg(dX) + [i(x.shape[0]), i(x.shape[1]), .float(epsilon)], count: x.shape[0])
    }

    public func scaleByTemperature(_ scores: Tensor, temperature: Tensor, into logits: Tensor) throws {
        try RoutingCheck.sameShape("scaleByTemperature", scores, logits)
        try RoutingCheck.scalar(temperature, "scaleByTemperature temperature")
        try launch1D("divide_by_scalar", in: "routing.cl", try arg(scores) + arg(temperature) + arg(logits) + [i(scores.count)],
                     count: scores.count)
    }

    public func scaleByTemperatureBackward(dLogits: Tensor, logits: Tensor, temperature: Tensor, dScores: Tensor, dTemperature: Tensor) throws {
        try RoutingCheck.sameShape("scaleByTemperatureBackward", dLogits, logits, dScores)
        try RoutingCheck.scalar(temperature, "scaleByTemperatureBackward temperature")
        try RoutingCheck.scalar(dTemperature, "scaleByTemperatureBackward dTemperature")
        // dTemperature first, so dScores may be dLogits itself (in-place backward).
        try deterministicSum(dLogits, times: logits, count: dLogits.count, scale: 1, divideByMinus: temperature, into: dTemperature)
        try launch1D("divide_by_scalar", in: "routing.cl", try arg(dLogits) + arg(temperature) + arg(dScores) + [i(dLogits.count)],
                     count: dLogits.count)
    }

    public func softmaxOverTokens(_ logits: Tensor, into weights: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverTokens", logits, weights)
        try launch1D("softmax_cols", in: "routing.cl", try arg(logits) + arg(weights) + [i(logits.shape[0]), i(logits.shape[1])],
                     count: logits.shape[1])
    }

    public func softmaxOverTokensBackward(weights: Tensor, dWeights: Tensor, dLogits: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverTokensBackward", weights, dWeights, dLogits)
        try launch1D("softmax_cols_backward", in: "routing.cl",
                     try arg(weights) + arg(dWeights) + arg(dLogits) + [i(weights.shape[0]), i(weights.shape[1])],
                     count: weights.shape[1])
    }

    public func softmaxOverSlots(_ logits: Tensor, into weights: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverSlots", logits, weights)
        try launch1D("softmax_rows", in: "routing.cl", try arg(logits) + arg(weights) + [i(logits.shape[0]), i(logits.shape[1])],
                     count: logits.shape[0])
    }

    public func softmaxOverSlotsBackward(weights: Tensor, dWeights: Tensor, dLogits: Tensor) throws {
        try RoutingCheck.sameShape("softmaxOverSlotsBackward", weights, dWeights, dLogits)
        try launch1D("softmax_rows_backward", in: "routing.cl",
                     try arg(weights) + arg(dWeights) + arg(weights) + [i(0)] + arg(dLogits) + [i(weights.shape[0]), i(weights.shape[1])],
                     count: weights.shape[0])
    }
}
