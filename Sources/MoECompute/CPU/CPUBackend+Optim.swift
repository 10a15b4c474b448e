import CKernels
import Foundation

/// `OptimOps` on the host.
extension CPUBackend {
    public func adamWStep(_ groups: [AdamWTensors], config: AdamWConfig, step: Int, guardNorm: Tensor?) throws {
        try require(step >= 1, "adamWStep: step numbers start at 1, got \(step)")
        for g in groups { try g.validate() }
        if let guardNorm {
            try require(guardNorm.count == 1, "adamWStep: guardNorm must hold one element")
            if !(try f32(guardNorm)[0]).isFinite { return }
        }
        let (c1, c2) = config.biasCorrections(step: step)
        let lr = config.learningRate, b1 = config.beta1, b2 = config.beta2, eps = config.eps
        for g in groups {
            let p = try f32(g.param), gr = try f32(g.grad), m = try f32(g.m), v = try f32(g.v)
            let decayed = g.decayed
            // Chunks of 4096 split over the cores; each chunk one vectorised C call.
            parallelFor((g.param.count + 4095) / 4096, work: g.param.count * 4) { range in
                let lo = range.lowerBound * 4096, hi = min(range.upperBound * 4096, g.param.count)
                guard lo < hi else { return }
                ck_adamw(p + lo, gr + lo, m + lo, v + lo, hi - lo, max(0, min(decayed - lo, hi - lo)),
                         lr, b1, b2, eps, g.weightDecay, c1, c2)
            }
        }
    }

    public func globalNorm(_ tensors: [Tensor], into norm: Tensor) throws {
        try OptimCheck.tensors("globalNorm", tensors + [norm])
        try require(norm.count == 1, "globalNorm: norm must hold one element, got \(norm.shape)")
        // Sum of squares per tensor in float64 (blocks of 4096 in eight float lanes, then added
        // in order), tensors added in list order: deterministic.
        // Blocks of 4096 summed in parallel into per-block partials, then added in
        // order: the same bits as one sequential pass, whatever the thread count.
        var total: Double = 0
        for t in tensors where t.count > 0 {
            let x = try f32(t), n = t.count, blocks = (n + 4095) / 4096
            var partials = [Double](repeating: 0, count: blocks)
            partials.withUnsafeMutableBufferPointer { out in
                parallelFor(blocks, work: n) { range in
                    for b in range { out[b] = ck_sum_of_squares(x + b * 4096, min(4096, n - b * 4096)) }
                }
            }
            for v in partials { total += v }
        }
        try f32(norm)[0] = Float(total.squareRoot())
    }

    public func clipByNorm(_ tensors: [Tensor], maxNorm: Float, norm: Tensor) throws {
        try OptimCheck.tensors("clipByNorm", tensors + [norm])
        try require(norm.count == 1, "clipByNorm: norm must hold one element, got \(norm.shape)")
        let factor = OptimCheck.clipFactor(norm: try f32(norm)[0], maxNorm: maxNorm)
        guard factor != 1 else { return }
        for t in tensors { try scale(t, by: factor) }
    }
}
