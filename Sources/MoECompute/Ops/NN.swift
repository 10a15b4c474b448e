/// LayerNorm, RMSNorm, GELU, SiLU/SwiGLU, softmax, token embedding, cross-entropy, attention helpers, with gradients.
/// Both backends implement every requirement; tests compare them with float64 references.
///
/// Conventions shared by every op here:
/// - "Rows" are the leading dimensions flattened and "features" the last one: a
///   `[B, T, H]` activation is `B*T` rows of `H` features. Ops that need the
///   feature count take it from a parameter tensor (`gamma`, a bias) or from
///   `shape.last`; reshape or `view` a tensor to give it the layout you mean.
/// - `accumulate: true` adds the result into the output (`dX += ...`), so a
///   residual stream's gradient can be summed in place; `false` overwrites it
///   (the old contents are never read, NaN included).
/// - Reductions over rows (`dGamma`, `dBeta`, bias gradients, losses, norms)
///   run in a fixed order that depends only on the shapes: the same inputs give
///   bit-identical results on the same backend. No float atomics.
/// - Element-wise ops may run in place (`out` the same tensor as the input)
///   unless the doc says otherwise.
///
/// A ViT from these ops and `gemm` (forward; each backward is the matching
/// `...Backward` op or the GEMMs transposed):
/// - patches: `transposeAxes` of images `[B, C, Hp, p, Wp, p]` with `[0, 2, 4, 1, 3, 5]`
///   to `[B*N, C*p*p]`, then one GEMM with the patch weights; the batched GEMM can
///   write straight into tokens `1...N` of `x: [B, 1+N, D]` (`strideC = (1+N)*D`,
///   a view at offset `D`). The CLS row of every image is a batched GEMM of a
///   `[1, 1]` one by `cls` (`strideA = strideB = 0`); its gradient one GEMM
///   `ones[1, B] x dX[:, 0, :]` (`ldb = (1+N)*D`). Positions: `addBroadcast(pos, to: x)`,
///   gradient `sumRows(dX, into: dPos)`.
/// - attention: `qkv = LN(x) W` as `[B, T, 3, heads, d]` -> `transposeAxes(.., [2, 0, 3, 1, 4])`
///   -> Q, K, V views `[B*heads, T, d]`; `S = Q K^T` (batched GEMM, transB);
///   `softmax(S, scale: 1/sqrt(d), causal:)`; `O = P V`; merge with `[0, 2, 1, 3]`.
///   The backward is spelled out in `NNTests.testAttentionThroughBatchedGemmMatchesReference`.
/// - MLP: GEMM, `addBroadcast` bias, `activation(.geluErf)`, GEMM; or `swiGLU` on `[rows, 2I]`.
/// - head: `layerNorm`, `meanPool` (or `tokens: 0..<1` for CLS), GEMM, `crossEntropy`,
///   `argmaxRows` for accuracy. Optimiser: `clipGradients`, `adamWStep`, `zeroGradients`.
public protocol NNOps: AnyObject {
    // MARK: Normalisation

    /// `y = (x - mean) * rstd * gamma + beta` per row, `rstd = 1/sqrt(var + eps)`
    /// (biased variance). `gamma`, `beta`: `[features]`; `x`, `y`: `rows * features`
    /// elements; saves `mean` and `rstd` (`[rows]`) for the backward pass.
    func layerNorm(_ x: Tensor, gamma: Tensor, beta: Tensor, eps: Float,
                   out y: Tensor, mean: Tensor, rstd: Tensor) throws

    /// Gradients of `layerNorm` given `dY`, the forward input `x` and the saved
    /// `mean`, `rstd`: `dX` (`rows * features`), `dGamma`, `dBeta` (`[features]`).
    /// `accumulate` applies to all three outputs.
    func layerNormBackward(dY: Tensor, x: Tensor, gamma: Tensor, mean: Tensor, rstd: Tensor,
                           dX: Tensor, dGamma: Tensor, dBeta: Tensor, accumulate: Bool) throws

    /// `y = x * rstd * gamma` per row, `rstd = 1/sqrt(mean(x^2) + eps)`; saves `rstd` (`[rows]`).
    func rmsNorm(_ x: Tensor, gamma: Tensor, eps: Float, out y: Tensor, rstd: Tensor) throws

    /// Gradients of `rmsNorm`: `dX` and `dGamma`; `accumulate` applies to both.
    func rmsNormBackward(dY: Tensor, x: Tensor, gamma: Tensor, rstd: Tensor,
                         dX: Tensor, dGamma: Tensor, accumulate: Bool) throws

    // MARK: Broadcasts and reductions over rows

    /// `y[r, :] += b` with `y` seen as rows of `b.count` elements. A bias add
    /// (`b: [H]`, `y: [N, H]`) or a positional embedding (`b: [T, H]`, `y: [B, T, H]`).
    /// Its backward is `sumRows(dY, into: dB)`.
    func addBroadcast(_ b: Tensor, to y: Tensor) throws

    /// Column sums: `out[j] (+)= sum_r x[r, j]` with `x` seen as rows of `out.count`
    /// elements (bias and positional-embedding gradients). Deterministic.
    func sumRows(_ x: Tensor, into out: Tensor, accumulate: Bool) throws

    // MARK: Activations

    /// `y = f(x)` element-wise.
    func activation(_ f: ActivationFunction, _ x: Tensor, out y: Tensor) throws

    /// `dX (+)= dY * f'(x)`, `x` the forward input. `dX` may be `dY`.
    func activationBackward(_ f: ActivationFunction, dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws

    /// SwiGLU on a fused projection: `x` is `[rows, 2I]` whose first half of each
    /// row is the gate `a` and second half the value `b` (one GEMM against
    /// `[W_gate | W_up]` produces it); `y[r, i] = silu(a[r, i]) * b[r, i]`, `y: [rows, I]`.
    /// `I` is `y.shape.last`. Not in place.
    func swiGLU(_ x: Tensor, out y: Tensor) throws

    /// Gradient of `swiGLU`: `dX: [rows, 2I]` (gate half, value half) from `dY: [rows, I]`.
    func swiGLUBackward(dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws

    // MARK: Softmax and attention helpers

    /// Row softmax of `scale * x` over the last dimension (`x.shape.last`),
    /// max-subtracted. With `causal`, rows are attention scores laid out
    /// `[B*heads, T, T]` (so `features == T`): query `i = row % T` sees keys
    /// `j <= i`; masked entries of `y` are exactly 0. `y` may be `x`.
    func softmax(_ x: Tensor, out y: Tensor, scale: Float, causal: Bool) throws

    /// `dX (+)= scale * y * (dY - sum_j dY_j y_j)` per row, `y` the softmax output
    /// (masked entries are 0 in `y`, so their gradient is 0). `dX` may be `dY`.
    func softmaxBackward(dY: Tensor, y: Tensor, dX: Tensor, scale: Float, accumulate: Bool) throws

    /// Copies `x` (shape `x.shape`, rank 1...6) into `out` with its axes permuted:
    /// `out.shape[i] == x.shape[permutation[i]]`. Attention uses it to split a
    /// packed `[B, T, 3, heads, d]` QKV projection into `[3, B, heads, T, d]`
    /// (permutation `[2, 0, 3, 1, 4]`: Q, K, V each contiguous `[B*heads, T, d]`
    /// for the batched GEMMs) and to merge heads `[B, heads, T, d] -> [B, T, heads, d]`
    /// (`[0, 2, 1, 3]`). The backward is the same op with the inverse permutation
    /// (`Reference.inversePermutation`). Not in place.
    func transposeAxes(_ x: Tensor, permutation: [Int], out: Tensor) throws

    // MARK: Embedding

    /// Token embedding lookup: `out[r, :] = table[ids[r], :]`. `table`: f32 `[V, D]`
    /// (`D = table.shape.last`); `ids`: i32 of any shape, `rows = ids.count`; `out`:
    /// f32 holding `rows * D` elements. An id outside `0..<V` writes a row of NaN
    /// (the device does not report it to the host; the NaN shows up in the loss).
    func embedding(table: Tensor, ids: Tensor, out: Tensor) throws

    /// Gradient of `embedding`, always accumulated:
    /// `dTable[v, :] += sum over r with ids[r] == v of dOut[r, :]`, added row by row
    /// in ascending `r` (no float atomics: bit-identical run to run). Ids outside
    /// `0..<V` are skipped; rows of `dTable` no id names are not touched.
    func embeddingBackward(dOut: Tensor, ids: Tensor, dTable: Tensor) throws

    // MARK: Loss and evaluation

    /// Cross-entropy with label smoothing `s` over `logits: [rows, classes]` and
    /// `labels: [rows]` (i32). The target is `q = (1 - s) * onehot(label) + s / classes`.
    /// A negative label (PyTorch's `ignore_index = -100`) means no target: its
    /// `rowLoss` is 0, its `dLogits` row 0, and it does not count in the mean. A
    /// label `>= classes` gives a NaN loss (and gradient) for its row, and so a NaN mean.
    /// Writes `rowLoss[r] = -sum_c q_c log softmax(z_r)_c` (`[rows]`), their mean
    /// over the `n` rows with a label `>= 0` into `meanLoss` (`[1]`, 0 when `n == 0`;
    /// a fixed-order reduction that stays on the device), and, when `dLogits` is
    /// given, the gradient of `gradientScale * meanLoss`:
    /// `dLogits = gradientScale * (softmax(z) - q) / n` (overwritten; not the
    /// `logits` tensor itself: the rows are read after dLogits is written).
    func crossEntropy(logits: Tensor, labels: Tensor, labelSmoothing: Float,
                      rowLoss: Tensor, meanLoss: Tensor, dLogits: Tensor?, gradientScale: Float) throws

    /// `out[r] = argmax_j x[r, j]` (i32, `[rows]`, ties to the lower index), `x.shape.last` columns.
    func argmaxRows(_ x: Tensor, out: Tensor) throws

    // MARK: Regularisation

    /// Inverted dropout: `y (+)= x * keep / (1 - p)`, where element `i` is kept when
    /// `dropoutHash(seed, i) >= p * 2^32` (`Reference.dropoutKeep`): the same mask on
    /// both backends for the same seed, and no mask to store. `p >= 1` gives zeros.
    /// The backward is this same op on `dY` with the same `p` and `seed`.
    func dropout(_ x: Tensor, p: Float, seed: UInt64, out y: Tensor, accumulate: Bool) throws

    /// `x[i] += std * z_i` with `z_i` standard normal from the counter hash of
    /// `(seed, 2i)` and `(seed, 2i + 1)` (Box-Muller, `Reference.gaussianNoise`):
    /// routing noise made on the device, nothing uploaded.
    func addGaussianNoise(_ x: Tensor, std: Float, seed: UInt64) throws

    /// Per-row scale (stochastic depth): `y[r, :] (+)= x[r, :] * m[r]`, rows of
    /// `x.count / m.count` elements. The caller draws `m` (0 or `1/keep`). The
    /// backward is the same op on `dY`. `y` may be `x` when not accumulating.
    func scaleRows(_ x: Tensor, by m: Tensor, out y: Tensor, accumulate: Bool) throws

    // MARK: Pooling

    /// `y[b, :] = mean over t in tokens of x[b, t, :]`, `x: [B, T, H]`, `y: [B, H]`.
    /// `tokens` = `0..<T` for mean pooling, `0..<1` to pick a CLS token.
    func meanPool(_ x: Tensor, tokens: Range<Int>, out y: Tensor) throws

    /// `dX[b, t, :] (+)= dY[b, :] / tokens.count` for t in `tokens`; without
    /// `accumulate` the other tokens of `dX` are set to 0.
    func meanPoolBackward(dY: Tensor, tokens: Range<Int>, dX: Tensor, accumulate: Bool) throws
}

/// Element-wise activations with a backward.
public enum ActivationFunction: String, Sendable, CaseIterable {
    /// `0.5 x (1 + erf(x / sqrt 2))`
    case geluErf = "gelu"
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`
    case geluTanh = "gelu_tanh"
    /// `x * sigmoid(x)`
    case silu

    /// The integer the kernels switch on.
    var code: Int32 {
        switch self {
        case .geluErf: return 0
        case .geluTanh: return 1
        case .silu: return 2
        }
    }
}

extension NNOps {
    /// `softmax` without scale or mask.
    public func softmax(_ x: Tensor, out y: Tensor) throws { try softmax(x, out: y, scale: 1, causal: false) }

    /// The backward of `dropout`: the same mask applied to `dY`.
    public func dropoutBackward(dY: Tensor, p: Float, seed: UInt64, dX: Tensor, accumulate: Bool) throws {
        try dropout(dY, p: p, seed: seed, out: dX, accumulate: accumulate)
    }

    /// The backward of `transposeAxes(x, permutation: p, out: y)`: `dY` has the
    /// permuted shape (`y.shape`), `dX` gets `x`'s layout (inverse permutation).
    public func transposeAxesBackward(dY: Tensor, permutation: [Int], dX: Tensor) throws {
        try transposeAxes(dY, permutation: Reference.inversePermutation(permutation), out: dX)
    }

    /// The backward of `scaleRows`: `dX (+)= dY * m` per row.
    public func scaleRowsBackward(dY: Tensor, by m: Tensor, dX: Tensor, accumulate: Bool) throws {
        try scaleRows(dY, by: m, out: dX, accumulate: accumulate)
    }
}

/// Shape checks shared by both backends, so both reject the same misuse with the same message.
enum NNCheck {
    static func f32(_ op: String, _ tensors: Tensor...) throws {
        for t in tensors { try require(t.dtype == .f32, "\(op) takes f32 tensors, got \(t.dtype) \(t.shape)") }
    }

    /// Rows of `features` elements in `x`.
    static func rows(_ op: String, _ x: Tensor, features: Int) throws -> Int {
        try require(features > 0, "\(op): feature count must be positive, got \(features)")
        try require(x.count % features == 0, "\(op): \(x.shape) is not rows of \(features) features")
        try require(x.count + x.offset < Int(Int32.max), "\(op): tensors over 2^31 elements are not supported")
        return x.count / features
    }

    static func count(_ op: String, _ t: Tensor, _ n: Int, _ what: String) throws {
        try require(t.count == n, "\(op): \(what) must hold \(n) elements, got \(t.shape)")
    }

    /// Validates a `transposeAxes` call; returns the input strides in output-axis order.
    static func permutation(_ x: Tensor, _ perm: [Int], _ out: Tensor) throws -> (dims: [Int], strides: [Int]) {
        let shape = x.shape
        try require(!shape.isEmpty && shape.count <= 6, "transposeAxes: rank must be 1...6, got \(shape)")
        try require(perm.sorted() == Array(0..<shape.count), "transposeAxes: \(perm) is not a permutation of 0..<\(shape.count)")
        try require(x.dtype == out.dtype, "transposeAxes: dtypes differ")
        let dims = perm.map { shape[$0] }
        try require(out.count == x.count, "transposeAxes: out \(out.shape) does not hold \(dims)")
        var strides = [Int](repeating: 1, count: shape.count)
        for i in stride(from: shape.count - 2, through: 0, by: -1) { strides[i] = strides[i + 1] * shape[i + 1] }
        return (dims, perm.map { strides[$0] })
    }

    static func pool(_ x: Tensor, _ tokens: Range<Int>, _ y: Tensor) throws -> (b: Int, t: Int, h: Int) {
        try require(x.rank == 3, "meanPool: x must be [B, T, H], got \(x.shape)")
        let (b, t, h) = (x.shape[0], x.shape[1], x.shape[2])
        try require(!tokens.isEmpty && tokens.lowerBound >= 0 && tokens.upperBound <= t,
                    "meanPool: token range \(tokens) is empty or outside 0..<\(t)")
        try require(y.count == b * h, "meanPool: pooled tensor must hold [\(b), \(h)], got \(y.shape)")
        try f32("meanPool", x, y)
        return (b, t, h)
    }

    /// `x: [rows, 2I]`, `y: [rows, I]`; returns `I`.
    static func swiGLU(x: Tensor, y: Tensor) throws -> Int {
        try f32("swiGLU", x, y)
        let h = y.shape.last ?? 1
        let rows = try self.rows("swiGLU", y, features: h)
        try require(x.count == rows * 2 * h, "swiGLU: x \(x.shape) must be [\(rows), \(2 * h)] for y \(y.shape)")
        return h
    }

    /// Rows and features (`x.shape.last`) of a softmax; `other` must match `x`.
    static func softmax(_ x: Tensor, _ other: Tensor, causal: Bool) throws -> (rows: Int, features: Int) {
        try f32("softmax", x, other)
        try require(other.count == x.count, "softmax: \(x.shape) and \(other.shape) differ in size")
        let f = x.shape.last ?? 1
        let rows = try self.rows("softmax", x, features: f)
        if causal { try require(rows % f == 0, "causal softmax: \(x.shape) is not [*, T, T] score blocks") }
        return (rows, f)
    }

    static func crossEntropy(_ logits: Tensor, _ labels: Tensor, _ rowLoss: Tensor, _ meanLoss: Tensor,
                             _ dLogits: Tensor?) throws -> (rows: Int, classes: Int) {
        try f32("crossEntropy", logits, rowLoss, meanLoss)
        try require(labels.dtype == .i32, "crossEntropy: labels must be i32, got \(labels.dtype)")
        let rows = labels.count
        try require(rows > 0 ? logits.count % rows == 0 && logits.count > 0 : logits.count == 0,
                    "crossEntropy: logits \(logits.shape) are not \(rows) rows")
        let c = rows > 0 ? logits.count / rows : 1
        try require(logits.shape.last == c || logits.rank == 1, "crossEntropy: logits \(logits.shape) must be [\(rows), classes]")
        try count("crossEntropy", rowLoss, rows, "rowLoss")
        try count("crossEntropy", meanLoss, 1, "meanLoss")
        if let dLogits { try f32("crossEntropy", dLogits); try count("crossEntropy", dLogits, logits.count, "dLogits") }
        try require(logits.count + logits.offset < Int(Int32.max), "crossEntropy: tensors over 2^31 elements are not supported")
        return (rows, c)
    }

    /// `table: [V, D]` f32, `ids` i32, `rows = ids.count`, `out` (or `dOut`) `rows * D` f32;
    /// returns `(V, D, rows)`. `op` names the caller in the messages.
    static func embedding(_ op: String, table: Tensor, ids: Tensor, rowsTensor: Tensor,
                          _ rowsName: String) throws -> (vocabulary: Int, dim: Int, rows: Int) {
        try f32(op, table, rowsTensor)
        try require(ids.dtype == .i32, "\(op): ids must be i32, got \(ids.dtype)")
        try require(table.rank >= 2, "\(op): table must be [vocabulary, dim], got \(table.shape)")
        let d = table.shape.last!
        let v = try self.rows(op, table, features: d)
        let rows = ids.count
        try count(op, rowsTensor, rows * d, "\(rowsName) (\(rows) ids of \(d) features)")
        try require(rowsTensor.count + rowsTensor.offset < Int(Int32.max), "\(op): tensors over 2^31 elements are not supported")
        return (v, d, rows)
    }

    static func argmax(_ x: Tensor, _ out: Tensor) throws -> (rows: Int, features: Int) {
        try f32("argmaxRows", x)
        try require(out.dtype == .i32, "argmaxRows: out must be i32, got \(out.dtype)")
        let f = x.shape.last ?? 1
        let rows = try self.rows("argmaxRows", x, features: f)
        try count("argmaxRows", out, rows, "out")
        return (rows, f)
    }

    /// Features per row of `x` for the per-row scales `m`.
    static func scaleRows(_ x: Tensor, _ m: Tensor) throws -> Int {
        try f32("scaleRows", m)
        try ElementwiseCheck.same("scaleRows", x)
        guard m.count > 0 else {
            try require(x.count == 0, "scaleRows: no row scales for \(x.shape)")
            return 1
        }
        try require(x.count % m.count == 0, "scaleRows: \(x.shape) is not \(m.count) rows")
        return max(1, x.count / m.count)
    }

    /// `p * 2^32` as the keep threshold for dropout (p in [0, 1)).
    static func dropoutThreshold(_ p: Float) -> UInt32 {
        let t = (Double(p) * 4294967296.0).rounded(.down)
        return t <= 0 ? 0 : UInt32(min(t, 4294967295.0))
    }
}
