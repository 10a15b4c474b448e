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

/// Expert weights stacked per expert: fc1 `[E, I, D]` + `[E, I]`, fc2 `[E, D, I]` + `[E, D]`,
/// applied to expert-contiguous rows with grouped GEMMs.
final class ExpertBank {
    let w1: Parameter, b1: Parameter, w2: Parameter, b2: Parameter
    let experts: Int, width: Int, hidden: Int
    let activation: ActivationFunction
    let dropout: Float
    let ws: Workspace

    /// `range`: the flat-buffer range of this MoE layer's experts (its name).
    init(_ store: ParameterStore, _ name: String, experts: Int, width: Int, hidden: Int,
         activation: ActivationFunction, dropout: Float, range: String) throws {
        self.experts = experts; self.width = width; self.hidden = hidden
        self.activation = activation; self.dropout = dropout
        w1 = try store.make("\(name).fc1.weight", [experts, hidden, width], .normal(std: 0.02), decays: true, range: range)
        b1 = try store.make("\(name).fc1.bias", [experts, hidden], .zeros, decays: false, range: range)
        w2 = try store.make("\(name).fc2.weight", [experts, width, hidden], .normal(std: 0.02), decays: true, range: range)
        b2 = try store.make("\(name).fc2.bias", [experts, width], .zeros, decays: false, range: range)
        ws = Workspace(backend: store.backend)
    }

    private var onesFilled = 0
    private var dropSeed: UInt64 = 0
    private var dropping = false

    /// yp[r] = expert_e(xp[r]) for the rows offsets[e]..<offsets[e+1]; `rows` is the buffers' row capacity.
    func forward(_ xp: Tensor, offsets: Tensor, rows: Int, into yp: Tensor, training: Bool, seed: UInt64) throws {
        let b = xp.backend
        let h = try ws.get("h", [rows, hidden]), a = try ws.get("a", [rows, hidden])
        try b.gemm(Gemm(m: rows, n: hidden, k: width, transB: true, batch: experts, strideB: hidden * width),
                   xp, w1.value, h, grouping: .rows(offsets: offsets), epilogue: GemmEpilogue(bias: b1.value))
        try b.activation(activation, h, out: a)
        dropping = training && dropout > 0
        dropSeed = seed
        if dropping { try b.dropout(a, p: dropout, seed: seed, out: a, accumulate: false) }
        try b.gemm(Gemm(m: rows, n: width, k: hidden, transB: true, batch: experts, strideB: width * hidden),
                   a, w2.value, yp, grouping: .rows(offsets: offsets), epilogue: GemmEpilogue(bias: b2.value))
    }

    /// From dYp: accumulates the expert gradients and writes dXp.
    func backward(dYp: Tensor, xp: Tensor, offsets: Tensor, rows: Int, dXp: Tensor) throws {
        let b = dYp.backend
        let h = try ws.get("h", [rows, hidden]), a = try ws.get("a", [rows, hidden])
        let ones = try ws.get("ones", [rows, 1])
        if onesFilled != rows { try b.fill(ones, value: 1); onesFilled = rows }
        // dW2_e += dYp_e^T a_e ; db2_e += dYp_e^T 1
        try b.gemm(Gemm(m: width, n: hidden, k: rows, transA: true, beta: 1, batch: experts, lda: width, ldb: hidden,
                        strideC: width * hidden), dYp, a, try w2.gradient(), grouping: .contraction(offsets: offsets), epilogue: .none)
        try b.gemm(Gemm(m: width, n: 1, k: rows, transA: true, beta: 1, batch: experts, lda: width, ldb: 1, strideC: width),
                   dYp, ones, try b2.gradient(), grouping: .contraction(offsets: offsets), epilogue: .none)
        // dA = dYp W2_e, through dropout and the activation.
        let dA = try ws.get("dA", [rows, hidden])
        try b.gemm(Gemm(m: rows, n: hidden, k: width, batch: experts, strideB: width * hidden),
                   dYp, w2.value, dA, grouping: .rows(offsets: offsets), epilogue: .none)
        if dropping { try b.dropout(dA, p: dropout, seed: dropSeed, out: dA, accumulate: false) }
        try b.activationBackward(activation, dY: dA, x: h, dX: dA, accumulate: false)
        try b.gemm(Gemm(m: hidden, n: width, k: rows, transA: true, beta: 1, batch: experts, lda: hidden, ldb: width,
                        strideC: hidden * width), dA, xp, try w1.gradient(), grouping: .contraction(offsets: offsets), epilogue: .none)
        try b.gemm(Gemm(m: hidden, n: 1, k: rows, transA: true, beta: 1, batch: experts, lda: hidden, ldb: 1, strideC: hidden),
                   dA, ones, try b1.gradient(), grouping: .contraction(offsets: offsets), epilogue: .none)
        try b.gemm(Gemm(m: rows, n: width, k: hidden, batch: experts, strideB: hidden * width),
                   dA, w1.value, dXp, grouping: .rows(offsets: offsets), epilogue: .none)
    }
}
