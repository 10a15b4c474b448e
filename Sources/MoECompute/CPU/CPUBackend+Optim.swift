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
            let decay = 1 - lr * g.weightDecay, decayed = g.decayed
            parallelFor(g.param.count, work: g.param.count * 4) { range in
                for i in range {
                    let decay: Float = i < decayed ? decay : 1
                    // Decoupled weight decay, then the bias-corrected Adam update.
                    let gi = gr[i]
                    let mi = b1 * m[i] + (1 - b1) * gi
                    let vi = b2 * v[i] + (1 - b2) * gi * gi
                    m[i] = mi; v[i] = vi
                    p[i] = p[i] * decay - lr * (mi * c1) / ((vi * c2).squareRoot() + eps)
                }
            }
        }
    }

    public func globalNorm(_ tensors: [Tensor], into norm: Tensor) throws {
        try OptimCheck.tensors("globalNorm", tensors + [norm])
        try require(norm.count == 1, "globalNorm: norm must hold one element, got \(norm.shape)")
        // Sum of squares per tensor in float64 (blocks of 4096 in eight float lanes, then added
        // in order), tensors added in list order: deterministic.
        var total: Double = 0
        for t in tensors where t.count > 0 {
            let p = try f32(t), n = t.count
            var start = 0
            while start < n {
                let end = min(n, start + 4096)
                let q = p + start
                total += Double(Self.laneSum(end - start, { let v = Self.load8(q, $0); return v * v }, { q[$0] * q[$0] }))
                start = end
            }
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
