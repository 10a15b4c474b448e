import Foundation

/// `OptimOps` as kernels from Kernels/optim.cl.
extension OpenCLBackend {
    /// Work-groups per tensor in the first pass of the norm: enough to fill a
    /// device, few enough that the second pass (one work-group) stays short.
    static let normGroups = 64

    /// The local size of the reduction kernels: 1 on a CPU device (each
    /// work-group then streams its block sequentially), else a power of two
    /// <= 256 and the device limit.
    private var reductionGroup: Int {
        if let g = Self.workGroupOverride { return min(g, maxReductionGroup) }
        return cpuShapes ? 1 : maxReductionGroup
    }

    public func adamWStep(_ groups: [AdamWTensors], config: AdamWConfig, step: Int, guardNorm: Tensor?) throws {
        try require(step >= 1, "adamWStep: step numbers start at 1, got \(step)")
        for g in groups { try g.validate() }
        if let guardNorm { try require(guardNorm.count == 1 && guardNorm.dtype == .f32, "adamWStep: guardNorm must hold one f32") }
        let guardArgs: [CLArg] = try guardNorm.map { try arg($0) + [.int(1)] } ?? [.buffer(try scratchPlaceholder()), .int(0), .int(0)]
        let (c1, c2) = config.biasCorrections(step: step)
        for g in groups where g.param.count > 0 {
            let args: [CLArg] = try arg(g.param) + arg(g.grad) + arg(g.m) + arg(g.v) + [
                .int(Int32(g.param.count)), .float(config.learningRate), .float(config.beta1), .float(config.beta2),
                .float(config.eps), .float(g.weightDecay), .float(c1), .float(c2), .int(Int32(g.decayed)),
            ] + guardArgs
            try launch1D("adamw", in: "optim.cl", args, count: g.param.count)
        }
    }

    public func globalNorm(_ tensors: [Tensor], into norm: Tensor) throws {
        try OptimCheck.tensors("globalNorm", tensors + [norm])
        try require(norm.count == 1, "globalNorm: norm must hold one element, got \(norm.shape)")
        let local = reductionGroup
        // Each tensor gets a fixed number of work-groups (by its size), each
        // writing one partial at its own slot: the order of the sum is fixed.
        let groupsPer = tensors.map { min(Self.normGroups, max(1, ($0.count + 4095) / 4096)) }
        let total = groupsPer.reduce(0, +)
        let partials = try scratch(total, slot: "partials")
        var slot = 0
        for (t, groups) in zip(tensors, groupsPer) {
            if t.count > 0 {
                try kernel("sumsq_partials", in: "optim.cl").launch(
                    try arg(t) + [.int(Int32(t.count)), .buffer(partials), .int(Int32(slot))],
                    global: [groups * local], local: [local])
            } else {
                try launch1D("fill_f32", in: "elementwise.cl", [.buffer(partials), .int(Int32(slot)), .int(1), .float(0)], count: 1)
            }
            slot += groups
        }
        try kernel("norm_finalize", in: "optim.cl").launch(
            [.buffer(partials), .int(Int32(total))] + (try arg(norm)), global: [local], local: [local])
    }

    public func clipByNorm(_ tensors: [Tensor], maxNorm: Float, norm: Tensor) throws {
        try OptimCheck.tensors("clipByNorm", tensors + [norm])
        try require(norm.count == 1, "clipByNorm: norm must hold one element, got \(norm.shape)")
        for t in tensors where t.count > 0 {
            try launch1D("clip_by_norm", in: "optim.cl",
                         try arg(t) + [.int(Int32(t.count))] + arg(norm) + [.float(maxNorm)], count: t.count)
        }
    }
}
