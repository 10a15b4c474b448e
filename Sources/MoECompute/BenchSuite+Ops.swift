import Foundation

/// Bench cases of the grouped GEMMs and of the routing, permute, nn and
/// optimiser ops. Bytes are the minimum each op must read and write (every
/// input element read once, every output element written once, index arrays
/// included); FLOPs only for the GEMMs.
extension BenchSuite {
    static let f32Bytes = 4.0

    /// Rows per expert: all experts alike, or expert 0 taking half the rows (and
    /// optionally `empty` experts with none), the rest split as evenly as possible.
    static func rowCounts(rows: Int, experts: Int, uneven: Bool, empty: Int = 0) -> [Int] {
        guard uneven, experts > 1 else {
            return (0..<experts).map { rows / experts + ($0 < rows % experts ? 1 : 0) }
        }
        let first = rows / 2, rest = rows - first
        let filled = max(experts - 1 - empty, 1)
        var counts = [first] + [Int](repeating: 0, count: experts - 1)
        for j in 0..<filled { counts[1 + empty + j] = rest / filled + (j < rest % filled ? 1 : 0) }
        return counts
    }

    static func offsets(_ counts: [Int]) -> [Int32] {
        var out: [Int32] = [0]
        for c in counts { out.append(out.last! + Int32(c)) }
        return out
    }

    /// Grouped GEMM (rows): the expert up-projection `yp_e = xp_e W_e^T` over
    /// expert-contiguous rows, offsets on the device. Timed together with one
    /// plain GEMM of the same total FLOPs (all rows times one expert's weights).
    static func groupedRowsCase(_ label: String, counts: [Int], k hh: Int, n ii: Int) -> BenchCase {
        BenchCase(kernel: "grouped-gemm-rows", shape: label) { backend in
            let e = counts.count, r = counts.reduce(0, +)
            let xp = try backend.tensor(randomValues(r * hh, seed: 11), shape: [r, hh])
            let w = try backend.tensor(randomValues(e * ii * hh, seed: 12), shape: [e, ii, hh])
            let y = try backend.zeros([r, ii]), y1 = try backend.zeros([r, ii])
            let off = try backend.tensor(ints: offsets(counts), shape: [e + 1])
            let g = Gemm(m: r, n: ii, k: hh, transB: true, batch: e, strideB: ii * hh)
            let single = Gemm(m: r, n: ii, k: hh, transB: true)
            return BenchWork(run: { try backend.gemm(g, xp, w, y, grouping: .rows(offsets: off), epilogue: .none) },
                             flops: 2 * Double(r) * Double(ii) * Double(hh),
                             companions: [("single_gemm", { try backend.gemm(single, xp, w, y1) })],
                             extra: ["largest_group_rows": Double(counts.max() ?? 0), "empty_groups": Double(counts.filter { $0 == 0 }.count)],
                             derive: { t, c in c["single_gemm"].map { ["vs_single_gemm": t / $0] } ?? [:] })
        }
    }

    /// Grouped GEMM (contraction): the expert weight gradient `dW_e = dA_e^T xp_e`
    /// over each expert's rows, against one `A^T B` GEMM over all rows.
    static func groupedContractionCase(_ label: String, counts: [Int], m ii: Int, n hh: Int) -> BenchCase {
        BenchCase(kernel: "grouped-gemm-dW", shape: label) { backend in
            let e = counts.count, r = counts.reduce(0, +)
            let da = try backend.tensor(randomValues(r * ii, seed: 13), shape: [r, ii])
            let xp = try backend.tensor(randomValues(r * hh, seed: 14), shape: [r, hh])
            let dw = try backend.zeros([e, ii, hh]), dw1 = try backend.zeros([ii, hh])
            let off = try backend.tensor(ints: offsets(counts), shape: [e + 1])
            let g = Gemm(m: ii, n: hh, k: r, transA: true, batch: e, lda: ii, ldb: hh, strideC: ii * hh)
            let single = Gemm(m: ii, n: hh, k: r, transA: true)
            return BenchWork(run: { try backend.gemm(g, da, xp, dw, grouping: .contraction(offsets: off), epilogue: .none) },
                             flops: 2 * Double(r) * Double(ii) * Double(hh),
                             companions: [("single_gemm", { try backend.gemm(single, da, xp, dw1) })],
                             derive: { t, c in c["single_gemm"].map { ["vs_single_gemm": t / $0] } ?? [:] })
        }
    }

    static func groupedCases(_ s: BenchShapes) -> [BenchCase] {
        let r = s.t * s.k, rf = s.t * s.fineK
        let uniform = rowCounts(rows: r, experts: s.e, uneven: false)
        let uneven = rowCounts(rows: r, experts: s.e, uneven: true)
        let empty = rowCounts(rows: r, experts: s.e, uneven: true, empty: max(1, s.e / 4))
        let fine = rowCounts(rows: rf, experts: s.fineE, uneven: false)
        let tag = "T=\(s.t) H=\(s.h)"
        return [
            groupedRowsCase("\(tag) I=\(s.i) E=\(s.e) k=\(s.k) uniform", counts: uniform, k: s.h, n: s.i),
            groupedRowsCase("\(tag) I=\(s.i) E=\(s.e) k=\(s.k) uneven (1/2 on one)", counts: uneven, k: s.h, n: s.i),
            groupedRowsCase("\(tag) I=\(s.i) E=\(s.e) k=\(s.k) uneven+\(max(1, s.e / 4)) empty", counts: empty, k: s.h, n: s.i),
            groupedRowsCase("\(tag) I=\(s.fineI) E=\(s.fineE) k=\(s.fineK) uniform", counts: fine, k: s.h, n: s.fineI),
            groupedContractionCase("\(tag) I=\(s.i) E=\(s.e) k=\(s.k) uniform", counts: uniform, m: s.i, n: s.h),
            groupedContractionCase("\(tag) I=\(s.i) E=\(s.e) k=\(s.k) uneven (1/2 on one)", counts: uneven, m: s.i, n: s.h),
        ]
    }

    // MARK: Routing

    static func gateCase(_ mode: GateMode, t: Int, e: Int, k: Int) -> BenchCase {
        let name = mode == .softmaxThenTopK ? "gate-softmax-topk" : "gate-topk-softmax"
        return BenchCase(kernel: name, shape: "T=\(t) E=\(e) k=\(k)") { backend in
            let logits = try backend.tensor(randomValues(t * e, seed: 21), shape: [t, e])
            let config = GateConfig(k: k, mode: mode, renormalize: mode == .softmaxThenTopK)
            let idx = try backend.zeros([t, k], dtype: .i32), w = try backend.zeros([t, k]), probs = try backend.zeros([t, e])
            // Reads the logits; writes probs, indices and weights.
            let bytes = f32Bytes * Double(2 * t * e + 2 * t * k)
            return BenchWork(run: { try backend.gate(logits: logits, config: config, expertIndex: idx, gateWeight: w, probs: probs) },
                             bytes: bytes)
        }
    }

    static func gateBackwardCase(t: Int, e: Int, k: Int) -> BenchCase {
        BenchCase(kernel: "gate-backward", shape: "T=\(t) E=\(e) k=\(k) softmax-topk") { backend in
            let logits = try backend.tensor(randomValues(t * e, seed: 22), shape: [t, e])
            let config = GateConfig(k: k, mode: .softmaxThenTopK, renormalize: true)
            let out = try backend.gate(logits: logits, config: config)
            let dw = try backend.tensor(randomValues(t * k, seed: 23), shape: [t, k]), dLogits = try backend.zeros([t, e])
            // Reads indices, weights, dWeights, probs; writes dLogits.
            let bytes = f32Bytes * Double(3 * t * k + 2 * t * e)
            return BenchWork(run: {
                try backend.gateBackward(config: config, expertIndex: out.expertIndex, gateWeight: out.gateWeight, probs: out.probs,
                                         dGateWeight: dw, dProbs: nil, dLogits: dLogits)
            }, bytes: bytes)
        }
    }

    /// Expert indices and weights of a softmax-top-k gate on random logits (about uniform load).
    static func randomGate(_ backend: Backend, t: Int, e: Int, k: Int) throws -> GateOutput {
        let logits = try backend.tensor(randomValues(t * e, seed: 31), shape: [t, e])
        return try backend.gate(logits: logits, config: GateConfig(k: k, renormalize: true))
    }

    static func dispatchPlanCase(_ policy: DropPolicy, t: Int, e: Int, k: Int, factor: Double) -> BenchCase {
        BenchCase(kernel: "dispatch-plan-\(policy.rawValue)", shape: "T=\(t) E=\(e) k=\(k) cf=\(factor)") { backend in
            let gate = try randomGate(backend, t: t, e: e, k: k)
            let config = DispatchConfig(experts: e, capacity: .factor(factor), dropPolicy: policy)
            let plan = try DispatchPlan.topK(on: backend, tokens: t, k: k, config: config)
            // Reads the indices (and the weights for `probs`); writes counts, offsets, destination, sourceOfRow.
            let reads = t * k * (policy == .probs ? 2 : 1)
            let bytes = f32Bytes * Double(reads + 2 * t * k + 2 * e + 1)
            return BenchWork(run: { try backend.dispatchPlan(expertIndex: gate.expertIndex, gateWeight: gate.gateWeight, config: config, into: plan) },
                             bytes: bytes)
        }
    }

    static func expertChoiceCase(t: Int, e: Int, factor: Double) -> BenchCase {
        BenchCase(kernel: "expert-choice", shape: "T=\(t) E=\(e) cf=\(factor)") { backend in
            let logits = try backend.tensor(randomValues(t * e, seed: 32), shape: [t, e])
            let probs = try backend.zeros([t, e])
            try backend.routerProbs(logits: logits, probs: probs)
            let c = ExpertChoice.capacity(tokens: t, experts: e, factor: factor)
            let plan = try DispatchPlan.expertChoice(on: backend, tokens: t, experts: e, capacity: c)
            let w = try backend.zeros([t, e])
            // Reads probs; writes destination, combine weights, sourceOfRow, counts, offsets.
            let bytes = f32Bytes * Double(3 * t * e + e * min(c, t) + 2 * e + 1)
            return BenchWork(run: { try backend.expertChoice(probs: probs, plan: plan, combineWeight: w) }, bytes: bytes,
                             extra: ["capacity": Double(c)])
        }
    }

    static func routingCases(_ s: BenchShapes) -> [BenchCase] {
        var out: [BenchCase] = []
        for mode in GateMode.allCases {
            out += [gateCase(mode, t: s.t, e: s.e, k: s.k), gateCase(mode, t: s.t, e: s.fineE, k: s.fineK),
                    gateCase(mode, t: s.bigT, e: s.e, k: s.k)]
        }
        out += [gateBackwardCase(t: s.t, e: s.e, k: s.k), gateBackwardCase(t: s.bigT, e: s.e, k: s.k)]
        for policy in DropPolicy.allCases {
            out += [dispatchPlanCase(policy, t: s.t, e: s.e, k: s.k, factor: 1.25),
                    dispatchPlanCase(policy, t: s.t, e: s.fineE, k: s.fineK, factor: 1.25),
                    dispatchPlanCase(policy, t: s.bigT, e: s.e, k: s.k, factor: 1.25)]
        }
        out += [expertChoiceCase(t: s.t, e: s.e, factor: 2), expertChoiceCase(t: s.bigT, e: s.e, factor: 2)]
        return out
    }

    // MARK: Permute and combine

    enum PermuteOp: String { case permute, unpermute, combine, combineBackward = "combine-backward" }

    static func permuteCase(_ op: PermuteOp, t: Int, h: Int, e: Int, k: Int) -> BenchCase {
        BenchCase(kernel: op.rawValue, shape: "T=\(t) H=\(h) E=\(e) k=\(k)") { backend in
            let gate = try randomGate(backend, t: t, e: e, k: k)
            let plan = try backend.dispatchPlan(expertIndex: gate.expertIndex, config: DispatchConfig(experts: e))
            let r = plan.maxRows
            let (th, rh, tk) = (Double(t * h), Double(r * h), Double(t * k))
            switch op {
            case .permute:
                let x = try backend.tensor(randomValues(t * h, seed: 41), shape: [t, h]), xp = try backend.zeros([r, h])
                // Each token row read once, each permuted row written once, the row map read.
                return BenchWork(run: { try backend.permute(x, plan: plan, into: xp) }, bytes: f32Bytes * (th + rh + Double(r)))
            case .unpermute:
                let dxp = try backend.tensor(randomValues(r * h, seed: 42), shape: [r, h]), dx = try backend.zeros([t, h])
                return BenchWork(run: { try backend.unpermute(dxp, plan: plan, into: dx) }, bytes: f32Bytes * (rh + th + tk))
            case .combine:
                let yp = try backend.tensor(randomValues(r * h, seed: 43), shape: [r, h]), out = try backend.zeros([t, h])
                // yp and the weights and destinations read, the token rows written.
                return BenchWork(run: { try backend.combine(yp, weights: gate.gateWeight, plan: plan, into: out) },
                                 bytes: f32Bytes * (rh + th + 2 * tk))
            case .combineBackward:
                let yp = try backend.tensor(randomValues(r * h, seed: 44), shape: [r, h])
                let dOut = try backend.tensor(randomValues(t * h, seed: 45), shape: [t, h])
                let dyp = try backend.zeros([r, h]), dw = try backend.zeros([t, k])
                // dOut, yp, weights, destinations read; dYp and dWeights written.
                return BenchWork(run: {
                    try backend.combineBackward(dOut: dOut, yp: yp, weights: gate.gateWeight, plan: plan, dYp: dyp, dWeights: dw)
                }, bytes: f32Bytes * (th + 2 * rh + 3 * tk))
            }
        }
    }

    static func permuteCases(_ s: BenchShapes) -> [BenchCase] {
        [PermuteOp.permute, .unpermute, .combine, .combineBackward].flatMap { op in
            [permuteCase(op, t: s.t, h: s.h, e: s.e, k: s.k), permuteCase(op, t: s.bigT, h: s.h, e: s.e, k: s.k),
             permuteCase(op, t: s.t, h: s.h, e: s.fineE, k: s.fineK)]
        }
    }

    // MARK: nn

    static func layerNormCase(backward: Bool, rows: Int, h: Int) -> BenchCase {
        BenchCase(kernel: backward ? "layer-norm-backward" : "layer-norm", shape: "\(rows)x\(h)") { backend in
            let x = try backend.tensor(randomValues(rows * h, seed: 51), shape: [rows, h])
            let gamma = try backend.tensor(randomValues(h, seed: 52), shape: [h]), beta = try backend.zeros([h])
            let y = try backend.zeros([rows, h]), mean = try backend.zeros([rows]), rstd = try backend.zeros([rows])
            try backend.layerNorm(x, gamma: gamma, beta: beta, eps: 1e-6, out: y, mean: mean, rstd: rstd)
            let (nh, n, hd) = (Double(rows * h), Double(rows), Double(h))
            if !backward {
                return BenchWork(run: { try backend.layerNorm(x, gamma: gamma, beta: beta, eps: 1e-6, out: y, mean: mean, rstd: rstd) },
                                 bytes: f32Bytes * (2 * nh + 2 * hd + 2 * n))
            }
            let dy = try backend.tensor(randomValues(rows * h, seed: 53), shape: [rows, h])
            let dx = try backend.zeros([rows, h]), dg = try backend.zeros([h]), db = try backend.zeros([h])
            // dY, x, mean, rstd, gamma read; dX, dGamma, dBeta written (not accumulating).
            return BenchWork(run: {
                try backend.layerNormBackward(dY: dy, x: x, gamma: gamma, mean: mean, rstd: rstd, dX: dx, dGamma: dg, dBeta: db,
                                              accumulate: false)
            }, bytes: f32Bytes * (3 * nh + 2 * n + 3 * hd))
        }
    }

    static func activationCase(backward: Bool, rows: Int, cols: Int) -> BenchCase {
        BenchCase(kernel: backward ? "gelu-backward" : "gelu", shape: "\(rows)x\(cols)") { backend in
            let n = rows * cols
            let x = try backend.tensor(randomValues(n, seed: 61), shape: [rows, cols]), y = try backend.zeros([rows, cols])
            if !backward {
                return BenchWork(run: { try backend.activation(.geluErf, x, out: y) }, bytes: f32Bytes * 2 * Double(n))
            }
            let dy = try backend.tensor(randomValues(n, seed: 62), shape: [rows, cols])
            return BenchWork(run: { try backend.activationBackward(.geluErf, dY: dy, x: x, dX: y, accumulate: false) },
                             bytes: f32Bytes * 3 * Double(n))
        }
    }

    static func softmaxCase(rows: Int, cols: Int, label: String) -> BenchCase {
        BenchCase(kernel: "softmax", shape: label) { backend in
            let x = try backend.tensor(randomValues(rows * cols, seed: 71), shape: [rows, cols]), y = try backend.zeros([rows, cols])
            return BenchWork(run: { try backend.softmax(x, out: y, scale: 0.125, causal: false) },
                             bytes: f32Bytes * 2 * Double(rows * cols))
        }
    }

    static func crossEntropyCase(rows: Int, classes: Int) -> BenchCase {
        BenchCase(kernel: "cross-entropy", shape: "\(rows)x\(classes) +dLogits") { backend in
            let logits = try backend.tensor(randomValues(rows * classes, seed: 72), shape: [rows, classes])
            var rng = SplitMix64(seed: 73)
            let labels = try backend.tensor(ints: (0..<rows).map { _ in Int32(rng.next() % UInt64(classes)) }, shape: [rows])
            let rowLoss = try backend.zeros([rows]), meanLoss = try backend.zeros([1]), dLogits = try backend.zeros([rows, classes])
            // Logits and labels read; row losses, the mean and dLogits written.
            return BenchWork(run: {
                try backend.crossEntropy(logits: logits, labels: labels, labelSmoothing: 0.1, rowLoss: rowLoss, meanLoss: meanLoss,
                                         dLogits: dLogits, gradientScale: 1)
            }, bytes: f32Bytes * (2 * Double(rows * classes) + 2 * Double(rows) + 1))
        }
    }

    static func transposeCase(b: Int, t: Int, heads: Int, d: Int) -> BenchCase {
        BenchCase(kernel: "transpose-axes", shape: "[\(b),\(t),3,\(heads),\(d)] -> [3,\(b),\(heads),\(t),\(d)]") { backend in
            let n = b * t * 3 * heads * d
            let x = try backend.tensor(randomValues(n, seed: 81), shape: [b, t, 3, heads, d])
            let y = try backend.zeros([3, b, heads, t, d])
            return BenchWork(run: { try backend.transposeAxes(x, permutation: [2, 0, 3, 1, 4], out: y) }, bytes: f32Bytes * 2 * Double(n))
        }
    }

    static func nnCases(_ s: BenchShapes) -> [BenchCase] {
        let a = s.attention
        return [
            layerNormCase(backward: false, rows: s.t, h: s.h), layerNormCase(backward: false, rows: s.bigT, h: s.h),
            layerNormCase(backward: true, rows: s.t, h: s.h), layerNormCase(backward: true, rows: s.bigT, h: s.h),
            softmaxCase(rows: s.t, cols: s.e, label: "\(s.t)x\(s.e) (router)"),
            softmaxCase(rows: a.b * a.heads * a.t, cols: a.t, label: "\(a.b * a.heads * a.t)x\(a.t) (attention B=\(a.b) heads=\(a.heads))"),
            crossEntropyCase(rows: s.t, classes: s.classes),
            activationCase(backward: false, rows: s.t, cols: s.i), activationCase(backward: false, rows: s.bigT, cols: s.h),
            activationCase(backward: true, rows: s.t, cols: s.i), activationCase(backward: true, rows: s.bigT, cols: s.h),
            transposeCase(b: a.b, t: a.t, heads: a.heads, d: a.d),
        ]
    }

    // MARK: Optimiser

    static func optimCases(_ s: BenchShapes) -> [BenchCase] {
        let p = s.parameters
        return [
            BenchCase(kernel: "adamw", shape: "\(p) params, 1 group") { backend in
                let param = try backend.tensor(randomValues(p, seed: 91), shape: [p])
                let grad = try backend.tensor(randomValues(p, seed: 92), shape: [p])
                let m = try backend.zeros([p]), v = try backend.zeros([p])
                let group = [AdamWTensors(param: param, grad: grad, m: m, v: v, weightDecay: 0.05)]
                // p, g, m, v read; p, m, v written.
                return BenchWork(run: { try backend.adamWStep(group, config: AdamWConfig(learningRate: 1e-4), step: 10) },
                                 bytes: f32Bytes * 7 * Double(p))
            },
            BenchCase(kernel: "global-norm", shape: "\(p) params, 4 tensors") { backend in
                let quarter = p / 4
                let ts = try (0..<4).map { try backend.tensor(randomValues(quarter, seed: 93 + UInt64($0)), shape: [quarter]) }
                let norm = try backend.zeros([1])
                return BenchWork(run: { try backend.globalNorm(ts, into: norm) }, bytes: f32Bytes * Double(4 * quarter + 1))
            },
        ]
    }
}
