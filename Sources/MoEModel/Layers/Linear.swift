import MoECompute

/// `y = x W^T + b` with `W: [out, in]` (Hugging Face layout) over rows of `x`.
final class Linear {
    let weight: Parameter
    let bias: Parameter?
    let inFeatures: Int, outFeatures: Int

    init(_ store: ParameterStore, _ name: String, in inFeatures: Int, out outFeatures: Int, bias: Bool = true,
         std: Float = 0.02) throws {
        self.inFeatures = inFeatures; self.outFeatures = outFeatures
        weight = try store.make("\(name).weight", [outFeatures, inFeatures], .normal(std: std), decays: true)
        self.bias = bias ? try store.make("\(name).bias", [outFeatures], .zeros, decays: false) : nil
    }

    /// `y = act(x W^T + b)` for `rows` rows.
    func forward(_ x: Tensor, rows: Int, into y: Tensor, activation: Activation = .none) throws {
        let b = x.backend
        try b.gemm(Gemm(m: rows, n: outFeatures, k: inFeatures, transB: true), x, weight.value, y,
                   grouping: .batch, epilogue: GemmEpilogue(bias: bias?.value, activation: activation))
    }

    /// Accumulates dW += dY^T x and db += colsum(dY) (not for frozen
    /// parameters); writes (or adds) dX = dY W when asked.
    func backward(dY: Tensor, x: Tensor, rows: Int, dX: Tensor?, accumulateDX: Bool = false) throws {
        let b = dY.backend
        if let dW = weight.grad { try b.gemm(Gemm(m: outFeatures, n: inFeatures, k: rows, transA: true, beta: 1), dY, x, dW) }
        if let dB = bias?.grad { try b.sumRows(dY, into: dB, accumulate: true) }
        if let dX {
            try b.gemm(Gemm(m: rows, n: inFeatures, k: outFeatures, beta: accumulateDX ? 1 : 0), dY, weight.value, dX)
        }
    }
}

/// LayerNorm over the last dimension with learnable gain and bias.
final class LayerNormLayer {
    let gamma: Parameter, beta: Parameter
    let features: Int
    let eps: Float = 1e-6

    init(_ store: ParameterStore, _ name: String, features: Int) throws {
        self.features = features
        gamma = try store.make("\(name).weight", [features], .ones, decays: false)
        beta = try store.make("\(name).bias", [features], .zeros, decays: false)
    }

    func forward(_ x: Tensor, into y: Tensor, mean: Tensor, rstd: Tensor) throws {
        try x.backend.layerNorm(x, gamma: gamma.value, beta: beta.value, eps: eps, out: y, mean: mean, rstd: rstd)
    }

    /// Adds the gradients: dX += ..., dGamma += ..., dBeta += ... (the caller
    /// seeds dX with the residual gradient, or zeros). A frozen norm's
    /// parameter gradients go to a scratch pair and are dropped.
    func backward(dY: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, dX: Tensor) throws {
        let b = dY.backend
        if frozenScratch == nil && (gamma.grad == nil || beta.grad == nil) {
            frozenScratch = (try b.zeros([features]), try b.zeros([features]))
        }
        try b.layerNormBackward(dY: dY, x: x, gamma: gamma.value, mean: mean, rstd: rstd, dX: dX,
                                dGamma: gamma.grad ?? frozenScratch!.gamma, dBeta: beta.grad ?? frozenScratch!.beta,
                                accumulate: true)
    }
    private var frozenScratch: (gamma: Tensor, beta: Tensor)?
}
