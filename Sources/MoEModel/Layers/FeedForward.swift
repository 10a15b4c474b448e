import MoECompute

/// The MLP slot of a transformer block: a dense MLP or an MoE layer.
protocol FeedForward: AnyObject {
    /// x: [rows, D] -> out: [rows, D] (overwritten). `step` seeds dropout and noise.
    func forward(_ x: Tensor, batch: Int, tokens: Int, into out: Tensor, training: Bool, step: Int) throws
    /// Writes (overwrites) the input gradient into `dX` and accumulates the
    /// parameter gradients. `lossScale` weights the auxiliary losses' gradients
    /// (1/N for N accumulated micro-batches, as the cross-entropy's).
    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, dX: Tensor, lossScale: Float) throws
    /// Auxiliary losses of the last forward recomputed on the host (name ->
    /// weighted value): for evaluation and tests; training reads them from
    /// `RoutedLayer.auxiliaryLossTensors` instead.
    func auxiliaryLosses() throws -> [String: Float]
}

/// Dense MLP: `fc2(act(fc1(x)))`.
final class DenseMLP: FeedForward {
    let fc1: Linear, fc2: Linear
    let activation: ActivationFunction
    let ws: Workspace

    init(_ store: ParameterStore, _ name: String, width: Int, hidden: Int, activation: ActivationFunction = .geluErf) throws {
        fc1 = try Linear(store, "\(name).fc1", in: width, out: hidden)
        fc2 = try Linear(store, "\(name).fc2", in: hidden, out: width)
        self.activation = activation
        ws = Workspace(backend: store.backend)
    }

    func forward(_ x: Tensor, batch: Int, tokens: Int, into out: Tensor, training: Bool, step: Int) throws {
        let rows = batch * tokens, b = x.backend
        let h = try ws.get("h", [rows, fc1.outFeatures]), a = try ws.get("a", [rows, fc1.outFeatures])
        try fc1.forward(x, rows: rows, into: h)
        try b.activation(activation, h, out: a)
        try fc2.forward(a, rows: rows, into: out)
    }

    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, dX: Tensor, lossScale: Float) throws {
        let rows = batch * tokens, b = dOut.backend
        let h = try ws.get("h", [rows, fc1.outFeatures]), a = try ws.get("a", [rows, fc1.outFeatures])
        let dA = try ws.get("dA", [rows, fc1.outFeatures])
        try fc2.backward(dY: dOut, x: a, rows: rows, dX: dA)
        try b.activationBackward(activation, dY: dA, x: h, dX: dA, accumulate: false)
        try fc1.backward(dY: dA, x: x, rows: rows, dX: dX, accumulateDX: false)
    }

    func auxiliaryLosses() throws -> [String: Float] { [:] }
}

/// What one expert computes.
enum ExpertStyle: Equatable {
    /// `fc2(act(fc1 x + b1)) + b2` (ViT, BERT): `fc1.weight [E, I, D]`, `fc1.bias`, `fc2.weight [E, D, I]`, `fc2.bias`.
    case mlp(ActivationFunction)
    /// `w2(silu(w1 x) * w3 x)` without biases (Llama, Mixtral): `w13 [E, 2I, D]` holds
    /// each expert's gate rows (Mixtral's w1) then its up rows (w3), so one grouped GEMM
    /// gives `[gate | up]` per row; `w2 [E, D, I]`.
    case swiGLU
}

/// Expert weights stacked per expert and applied to expert-contiguous rows with grouped GEMMs.
final class ExpertBank {
    let w1: Parameter, b1: Parameter?, w2: Parameter, b2: Parameter?
    /// Experts held (and run) here: all of them, or this rank's share under expert parallelism.
    let experts: Int, width: Int, hidden: Int
    /// The experts held here, by global index (`0..<totalExperts` without expert parallelism).
    let held: Range<Int>
    var totalExperts: Int { w1.totalExperts }
    let style: ExpertStyle
    let dropout: Float
    let ws: Workspace
    /// Columns of the first GEMM: `hidden`, or `2 * hidden` for the gate and up halves.
    var firstWidth: Int { style == .swiGLU ? 2 * hidden : hidden }

    /// `range`: the flat-buffer range of this MoE layer's experts (its name).
    /// `held`: expert parallelism, the experts (global indices) this rank holds
    /// and runs; nil: all `experts`.
    init(_ store: ParameterStore, _ name: String, experts: Int, width: Int, hidden: Int,
         style: ExpertStyle, dropout: Float, range: String, std: Float = 0.02, scratch: Workspace? = nil,
         held: Range<Int>? = nil) throws {
        self.held = held ?? 0..<experts
        self.experts = self.held.count; self.width = width; self.hidden = hidden
        self.style = style; self.dropout = dropout
        switch style {
        case .mlp:
            w1 = try store.make("\(name).fc1.weight", [experts, hidden, width], .normal(std: std), decays: true, range: range, expertRows: held)
            b1 = try store.make("\(name).fc1.bias", [experts, hidden], .zeros, decays: false, range: range, expertRows: held)
            w2 = try store.make("\(name).fc2.weight", [experts, width, hidden], .normal(std: std), decays: true, range: range, expertRows: held)
            b2 = try store.make("\(name).fc2.bias", [experts, width], .zeros, decays: false, range: range, expertRows: held)
        case .swiGLU:
            w1 = try store.make("\(name).w13", [experts, 2 * hidden, width], .normal(std: std), decays: true, range: range, expertRows: held)
            w2 = try store.make("\(name).w2", [experts, width, hidden], .normal(std: std), decays: true, range: range, expertRows: held)
            b1 = nil; b2 = nil
        }
        ws = Workspace(backend: store.backend)
        self.scratch = scratch ?? ws
    }
    /// Backward temporaries (shared by the model's layers when it passes one).
    let scratch: Workspace

    private var onesFilled = 0
    private var dropSeed: UInt64 = 0
    private var dropping = false

    /// SwiGLU experts keep only `h` (gate and up) for the backward and recompute
    /// `a = silu(gate) * up` there: one cheap pass instead of a `[rows, I]` buffer per layer.
    var recomputesActivation: Bool { style == .swiGLU }
    /// Where `a` lives: the shared scratch when it is recomputed, else this bank's own workspace.
    func activationBuffer(rows: Int) throws -> Tensor {
        try (recomputesActivation ? scratch : ws).get(recomputesActivation ? "experts.a" : "a", [rows, hidden])
    }

    /// yp[r] = expert_e(xp[r]) for the rows offsets[e]..<offsets[e+1]; `rows` is the buffers' row capacity.
    func forward(_ xp: Tensor, offsets: Tensor, rows: Int, into yp: Tensor, training: Bool, seed: UInt64) throws {
        let b = xp.backend, f = firstWidth
        let h = try ws.get("h", [rows, f]), a = try activationBuffer(rows: rows)
        try b.gemm(Gemm(m: rows, n: f, k: width, transB: true, batch: experts, strideB: f * width),
                   xp, w1.value, h, grouping: .rows(offsets: offsets), epilogue: GemmEpilogue(bias: b1?.value))
        switch style {
        case .mlp(let activation): try b.activation(activation, h, out: a)
        case .swiGLU: try b.swiGLU(h, out: a)
        }
        dropping = training && dropout > 0
        dropSeed = seed
        if dropping { try b.dropout(a, p: dropout, seed: seed, out: a, accumulate: false) }
        try b.gemm(Gemm(m: rows, n: width, k: hidden, transB: true, batch: experts, strideB: width * hidden),
                   a, w2.value, yp, grouping: .rows(offsets: offsets), epilogue: GemmEpilogue(bias: b2?.value))
    }

    /// From dYp: accumulates the expert gradients (frozen experts get none) and writes dXp.
    func backward(dYp: Tensor, xp: Tensor, offsets: Tensor, rows: Int, dXp: Tensor) throws {
        let b = dYp.backend, f = firstWidth
        let h = try ws.get("h", [rows, f]), a = try activationBuffer(rows: rows)
        if recomputesActivation {
            try b.swiGLU(h, out: a)
            if dropping { try b.dropout(a, p: dropout, seed: dropSeed, out: a, accumulate: false) }
        }
        let ones = try ws.get("ones", [rows, 1])
        if (b1?.grad != nil || b2?.grad != nil) && onesFilled != rows { try b.fill(ones, value: 1); onesFilled = rows }
        // dW2_e += dYp_e^T a_e ; db2_e += dYp_e^T 1
        if let dW2 = w2.grad {
            try b.gemm(Gemm(m: width, n: hidden, k: rows, transA: true, beta: 1, batch: experts, lda: width, ldb: hidden,
                            strideC: width * hidden), dYp, a, dW2, grouping: .contraction(offsets: offsets), epilogue: .none)
        }
        if let dB2 = b2?.grad {
            try b.gemm(Gemm(m: width, n: 1, k: rows, transA: true, beta: 1, batch: experts, lda: width, ldb: 1, strideC: width),
                       dYp, ones, dB2, grouping: .contraction(offsets: offsets), epilogue: .none)
        }
        // dA = dYp W2_e, through dropout and the activation.
        let dA = try scratch.get("experts.dA", [rows, hidden])
        try b.gemm(Gemm(m: rows, n: hidden, k: width, batch: experts, strideB: width * hidden),
                   dYp, w2.value, dA, grouping: .rows(offsets: offsets), epilogue: .none)
        if dropping { try b.dropout(dA, p: dropout, seed: dropSeed, out: dA, accumulate: false) }
        let dH: Tensor
        switch style {
        case .mlp(let activation):
            try b.activationBackward(activation, dY: dA, x: h, dX: dA, accumulate: false)
            dH = dA
        case .swiGLU:
            dH = try scratch.get("experts.dH", [rows, f])
            try b.swiGLUBackward(dY: dA, x: h, dX: dH, accumulate: false)
        }
        if let dW1 = w1.grad {
            try b.gemm(Gemm(m: f, n: width, k: rows, transA: true, beta: 1, batch: experts, lda: f, ldb: width,
                            strideC: f * width), dH, xp, dW1, grouping: .contraction(offsets: offsets), epilogue: .none)
        }
        if let dB1 = b1?.grad {
            try b.gemm(Gemm(m: f, n: 1, k: rows, transA: true, beta: 1, batch: experts, lda: f, ldb: 1, strideC: f),
                       dH, ones, dB1, grouping: .contraction(offsets: offsets), epilogue: .none)
        }
        try b.gemm(Gemm(m: rows, n: width, k: f, batch: experts, strideB: f * width),
                   dH, w1.value, dXp, grouping: .rows(offsets: offsets), epilogue: .none)
    }
}
