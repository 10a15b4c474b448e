import Foundation

private let workGroupOverrideLock = NSLock()
nonisolated(unsafe) private var workGroupOverrideValue: Int?

/// `NNOps` as kernels from Kernels/nn.cl.
extension OpenCLBackend {
    /// Forces the work-group size of the nn.cl row kernels and the optim.cl
    /// reductions (a power of two in 1...256, and the GPU-style launch shapes
    /// with it) instead of the per-device choice; `nil` restores that. For tests,
    /// which run the GPU code paths on a CPU device, and for tuning.
    public static var workGroupOverride: Int? {
        get { workGroupOverrideLock.lock(); defer { workGroupOverrideLock.unlock() }; return workGroupOverrideValue }
        set {
            precondition(newValue.map { $0 >= 1 && $0 <= 256 && $0 & ($0 - 1) == 0 } ?? true,
                         "work-group override must be a power of two in 1...256")
            workGroupOverrideLock.lock(); workGroupOverrideValue = newValue; workGroupOverrideLock.unlock()
        }
    }

    /// Whether to use the launch shapes for CPU devices (one work-item per row,
    /// per reduction block, per column chunk) rather than the GPU ones.
    var cpuShapes: Bool { tuning.cpuShapes && Self.workGroupOverride == nil }

    /// Rows summed per work-item in the first pass of a column reduction (ROW_CHUNK in nn.cl).
    static let rowChunk = 64

    /// The work-group size for a row kernel over `features`. On a CPU device
    /// (PoCL runs a work-group as loops on one core) one work-item per row,
    /// looping over contiguous features, is fastest: no barriers, sequential
    /// reads (4-5x the bandwidth of 256-item groups on PoCL). On GPUs a power
    /// of two <= 256 (the kernels' local buffers) and <= the device limit, no
    /// larger than the row needs.
    func rowGroup(_ features: Int) -> Int {
        if let g = Self.workGroupOverride { return min(g, maxReductionGroup) }
        if cpuShapes { return 1 }
        var g = 1
        while g < features && g < maxReductionGroup { g *= 2 }
        return g
    }

    /// The largest power of two <= 256 (the kernels' local buffers) and <= the device limit.
    var maxReductionGroup: Int {
        var g = 1
        while g * 2 <= min(256, tuning.elementwiseGroup) { g *= 2 }
        return g
    }

    /// One work-group per row.
    func launchRows(_ name: String, in file: String, _ args: [CLArg], rows: Int, features: Int) throws {
        let g = rowGroup(features)
        try kernel(name, in: file).launch(args, global: [rows * g], local: [g])
    }

    /// A device buffer for intermediate results, not zeroed (every element is written before it is read).
    /// A grow-only temporary buffer of `count` floats in `slot` (see `scratchTensor`).
    func scratch(_ count: Int, slot: String) throws -> CLBuffer { try buffer(try scratchTensor(slot, count)) }

    private func flag(_ b: Bool) -> CLArg { .int(b ? 1 : 0) }
    private func int(_ v: Int) -> CLArg { .int(Int32(v)) }

    /// Column sums of `rows x cols` partial sums (already in `part`, `chunks` rows) into `out`.
    private func finalizeColumns(_ part: CLBuffer, chunks: Int, cols: Int, out: Tensor, accumulate: Bool) throws {
        try launch1D("sum_partials_finalize", in: "nn.cl",
                     [.buffer(part), int(chunks), int(cols)] + arg(out) + [flag(accumulate)], count: cols)
    }

    // MARK: Normalisation

    private func normForward(_ x: Tensor, gamma: Tensor, beta: Tensor?, eps: Float, y: Tensor,
                             mean: Tensor?, rstd: Tensor) throws {
        let op = beta == nil ? "rmsNorm" : "layerNorm"
        try NNCheck.f32(op, x, gamma, y, rstd)
        let f = gamma.count
        let rows = try NNCheck.rows(op, x, features: f)
        try NNCheck.count(op, y, x.count, "y")
        try NNCheck.count(op, rstd, rows, "rstd")
        if let beta { try NNCheck.f32(op, beta); try NNCheck.count(op, beta, f, "beta") }
        if let mean { try NNCheck.f32(op, mean); try NNCheck.count(op, mean, rows, "mean") }
        guard rows > 0 else { return }
        let args: [CLArg] = try arg(x) + arg(gamma) + arg(beta ?? gamma) + arg(y) + arg(mean ?? rstd) + arg(rstd)
            + [int(f), .float(eps), flag(beta != nil)]
        try launchRows("norm_forward", in: "nn.cl", args, rows: rows, features: f)
    }

    private func normBackward(dY: Tensor, x: Tensor, gamma: Tensor, mean: Tensor?, rstd: Tensor,
                              dX: Tensor, dGamma: Tensor, dBeta: Tensor?, accumulate: Bool) throws {
        let op = dBeta == nil ? "rmsNormBackward" : "layerNormBackward"
        try NNCheck.f32(op, dY, x, gamma, rstd, dX, dGamma)
        let f = gamma.count
        let rows = try NNCheck.rows(op, x, features: f)
        try NNCheck.count(op, dY, x.count, "dY")
        try NNCheck.count(op, dX, x.count, "dX")
        try NNCheck.count(op, rstd, rows, "rstd")
        try NNCheck.count(op, dGamma, f, "dGamma")
        if let dBeta { try NNCheck.f32(op, dBeta); try NNCheck.count(op, dBeta, f, "dBeta") }
        if let mean { try NNCheck.f32(op, mean); try NNCheck.count(op, mean, rows, "mean") }
        let centered = dBeta != nil
        if rows > 0 {
            let args: [CLArg] = try arg(dY) + arg(x) + arg(gamma) + arg(mean ?? rstd) + arg(rstd) + arg(dX)
                + [int(f), flag(centered), flag(accumulate)]
            try launchRows("norm_backward_dx", in: "nn.cl", args, rows: rows, features: f)
        }
        // dGamma, dBeta: fixed row chunks, then the chunks summed in order.
        let chunks = max(1, (rows + Self.rowChunk - 1) / Self.rowChunk)
        let partG = try scratch(chunks * f, slot: "partials"), partB = try scratch(centered ? chunks * f : 1, slot: "partials2")
        // An empty input still launches one chunk, which writes zeros.
        let args: [CLArg] = try arg(dY) + arg(x) + arg(mean ?? rstd) + arg(rstd)
            + [.buffer(partG), .buffer(partB), int(rows), int(f), flag(centered)]
        if cpuShapes {
            try kernel("norm_param_partials_rowwise", in: "nn.cl").launch(args, global: [chunks], local: [1])
        } else {
            try kernel("norm_param_partials", in: "nn.cl").launch(args, global: [f, chunks], local: [min(f, 64), 1])
        }
        try finalizeColumns(partG, chunks: chunks, cols: f, out: dGamma, accumulate: accumulate)
        if let dBeta { try finalizeColumns(partB, chunks: chunks, cols: f, out: dBeta, accumulate: accumulate) }
    }

    public func layerNorm(_ x: Tensor, gamma: Tensor, beta: Tensor, eps: Float,
                          out y: Tensor, mean: Tensor, rstd: Tensor) throws {
        try normForward(x, gamma: gamma, beta: beta, eps: eps, y: y, mean: mean, rstd: rstd)
    }

    public func layerNormBackward(dY: Tensor, x: Tensor, gamma: Tensor, mean: Tensor, rstd: Tensor,
                                  dX: Tensor, dGamma: Tensor, dBeta: Tensor, accumulate: Bool) throws {
        try normBackward(dY: dY, x: x, gamma: gamma, mean: mean, rstd: rstd, dX: dX, dGamma: dGamma, dBeta: dBeta,
                         accumulate: accumulate)
    }

    public func rmsNorm(_ x: Tensor, gamma: Tensor, eps: Float, out y: Tensor, rstd: Tensor) throws {
        try normForward(x, gamma: gamma, beta: nil, eps: eps, y: y, mean: nil, rstd: rstd)
    }

    public func rmsNormBackward(dY: Tensor, x: Tensor, gamma: Tensor, rstd: Tensor,
                                dX: Tensor, dGamma: Tensor, accumulate: Bool) throws {
        try normBackward(dY: dY, x: x, gamma: gamma, mean: nil, rstd: rstd, dX: dX, dGamma: dGamma, dBeta: nil,
                         accumulate: accumulate)
    }

    // MARK: Broadcasts and reductions

    public func addBroadcast(_ b: Tensor, to y: Tensor) throws {
        try NNCheck.f32("addBroadcast", b, y)
        _ = try NNCheck.rows("addBroadcast", y, features: b.count)
        try launch1D("add_broadcast", in: "nn.cl", try arg(b) + arg(y) + [int(y.count), int(b.count)], count: y.count)
    }

    public func sumRows(_ x: Tensor, into out: Tensor, accumulate: Bool) throws {
        try NNCheck.f32("sumRows", x, out)
        let cols = out.count
        guard cols > 0 else { return }
        let rows = try NNCheck.rows("sumRows", x, features: cols)
        let chunks = max(1, (rows + Self.rowChunk - 1) / Self.rowChunk)
        let part = try scratch(chunks * cols, slot: "partials")
        let args: [CLArg] = try arg(x) + [.buffer(part), int(rows), int(cols)]
        if cpuShapes {
            try kernel("sum_rows_partials_rowwise", in: "nn.cl").launch(args, global: [chunks], local: [1])
        } else {
            try kernel("sum_rows_partials", in: "nn.cl").launch(args, global: [cols, chunks], local: [min(cols, 64), 1])
        }
        try finalizeColumns(part, chunks: chunks, cols: cols, out: out, accumulate: accumulate)
    }

    // MARK: Activations

    public func activation(_ f: ActivationFunction, _ x: Tensor, out y: Tensor) throws {
        try ElementwiseCheck.same("activation", x, y)
        try launch1D("activation_forward", in: "nn.cl", try arg(x) + arg(y) + [int(x.count), .int(f.code)], count: x.count)
    }

    public func activationBackward(_ f: ActivationFunction, dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws {
        try ElementwiseCheck.same("activationBackward", dY, x, dX)
        try launch1D("activation_backward", in: "nn.cl",
                     try arg(dY) + arg(x) + arg(dX) + [int(x.count), .int(f.code), flag(accumulate)], count: x.count)
    }

    public func swiGLU(_ x: Tensor, out y: Tensor) throws {
        let h = try NNCheck.swiGLU(x: x, y: y)
        try launch1D("swiglu_forward", in: "nn.cl", try arg(x) + arg(y) + [int(y.count), int(h)], count: y.count)
    }

    public func swiGLUBackward(dY: Tensor, x: Tensor, dX: Tensor, accumulate: Bool) throws {
        let h = try NNCheck.swiGLU(x: x, y: dY)
        try NNCheck.f32("swiGLUBackward", dX)
        try NNCheck.count("swiGLUBackward", dX, x.count, "dX")
        try launch1D("swiglu_backward", in: "nn.cl",
                     try arg(dY) + arg(x) + arg(dX) + [int(dY.count), int(h), flag(accumulate)], count: dY.count)
    }

    // MARK: Softmax and layout

    public func softmax(_ x: Tensor, out y: Tensor, scale: Float, causal: Bool) throws {
        let (rows, f) = try NNCheck.softmax(x, y, causal: causal)
        guard rows > 0 else { return }
        try launchRows("softmax_forward", in: "nn.cl", try arg(x) + arg(y) + [int(f), .float(scale), flag(causal)],
                       rows: rows, features: f)
    }

    public func softmaxBackward(dY: Tensor, y: Tensor, dX: Tensor, scale: Float, accumulate: Bool) throws {
        let (rows, f) = try NNCheck.softmax(y, dY, causal: false)
        try NNCheck.f32("softmaxBackward", dX)
        try NNCheck.count("softmaxBackward", dX, y.count, "dX")
        guard rows > 0 else { return }
        try launchRows("softmax_backward", in: "nn.cl",
                       try arg(dY) + arg(y) + arg(dX) + [int(f), .float(scale), flag(accumulate)], rows: rows, features: f)
    }

    public func transposeAxes(_ x: Tensor, permutation: [Int], out: Tensor) throws {
        let (dims, strides) = try NNCheck.permutation(x, permutation, out)
        guard x.count > 0 else { return }
        // Pad to six axes on the left: size-1 axes contribute nothing to the index.
        let pad = 6 - dims.count
        let d = [Int](repeating: 1, count: pad) + dims, s = [Int](repeating: 0, count: pad) + strides
        let outer = x.count / d[5], walkers = cpuShapes ? 1 : min(d[5], 64)
        try kernel("transpose_axes", in: "nn.cl").launch(
            try arg(x) + arg(out) + d.map(int) + s.map(int), global: [walkers, outer], local: [walkers, 1])
    }

    // MARK: Embedding

    public func embedding(table: Tensor, ids: Tensor, out: Tensor) throws {
        let (v, d, rows) = try NNCheck.embedding("embedding", table: table, ids: ids, rowsTensor: out, "out")
        let args: [CLArg] = try arg(table) + arg(ids) + arg(out) + [int(v), int(d)]
        if cpuShapes {
            try kernel("embedding_forward_rowwise", in: "nn.cl").launch(args + [int(rows)], global: [rows], local: [1])
        } else {
            try launch1D("embedding_forward", in: "nn.cl", args + [int(rows * d)], count: rows * d)
        }
    }

    public func embeddingBackward(dOut: Tensor, ids: Tensor, dTable: Tensor) throws {
        let (v, d, rows) = try NNCheck.embedding("embeddingBackward", table: dTable, ids: ids, rowsTensor: dOut, "dOut")
        guard rows > 0 else { return }
        let args: [CLArg] = try arg(dOut) + arg(ids) + arg(dTable) + [int(rows), int(v), int(d)]
        if cpuShapes {
            try kernel("embedding_backward_rowwise", in: "nn.cl").launch(args, global: [rows], local: [1])
        } else {
            // A full group whatever D: the group also scans the ids, a tile of g at a time.
            let g = maxReductionGroup
            try kernel("embedding_backward", in: "nn.cl").launch(args, global: [rows * g], local: [g])
        }
    }

    // MARK: Loss and evaluation

    public func crossEntropy(logits: Tensor, labels: Tensor, labelSmoothing: Float,
                             rowLoss: Tensor, meanLoss: Tensor, dLogits: Tensor?, gradientScale: Float) throws {
        let (rows, c) = try NNCheck.crossEntropy(logits, labels, rowLoss, meanLoss, dLogits)
        guard rows > 0 else { return try fill(meanLoss, value: 0) }
        // The rows with a target (label >= 0), counted on the device: the mean and
        // the gradient divide by it without a host sync.
        let targets = CLArg.buffer(try buffer(try scratchTensor("targets", 1, dtype: .i32)))
        let g = rowGroup(rows)
        try kernel("count_targets", in: "nn.cl").launch(try arg(labels) + [targets, int(rows)], global: [g], local: [g])
        let grad = dLogits ?? logits
        let args: [CLArg] = try arg(logits) + arg(labels) + arg(rowLoss) + arg(grad)
            + [int(c), .float(labelSmoothing), flag(dLogits != nil), targets, int(rows),
               .float(gradientScale), .float(gradientScale / Float(rows))]
        try launchRows("cross_entropy_rows", in: "nn.cl", args, rows: rows, features: c)
        try kernel("mean_loss", in: "nn.cl").launch(try arg(rowLoss) + arg(meanLoss) + [int(rows), targets],
                                                    global: [g], local: [g])
    }

    public func argmaxRows(_ x: Tensor, out: Tensor) throws {
        let (rows, f) = try NNCheck.argmax(x, out)
        try launch1D("argmax_rows", in: "nn.cl", try arg(x) + arg(out) + [int(rows), int(f)], count: rows)
    }

    // MARK: Regularisation and pooling

    public func addGaussianNoise(_ x: Tensor, std: Float, seed: UInt64) throws {
        try ElementwiseCheck.same("addGaussianNoise", x)
        guard x.count > 0 else { return }
        try launch1D("add_gaussian_noise", in: "nn.cl", try arg(x) + [
            int(x.count), .float(std), .int(Int32(bitPattern: UInt32(truncatingIfNeeded: seed))),
            .int(Int32(bitPattern: UInt32(truncatingIfNeeded: seed >> 32))),
        ], count: x.count)
    }

    public func dropout(_ x: Tensor, p: Float, seed: UInt64, out y: Tensor, accumulate: Bool) throws {
        try ElementwiseCheck.same("dropout", x, y)
        try require(p >= 0 && !p.isNaN, "dropout probability must be >= 0, got \(p)")
        let threshold = NNCheck.dropoutThreshold(p)
        let args: [CLArg] = try arg(x) + arg(y) + [
            int(x.count), .int(Int32(bitPattern: threshold)),
            .int(Int32(bitPattern: UInt32(truncatingIfNeeded: seed))),
            .int(Int32(bitPattern: UInt32(truncatingIfNeeded: seed >> 32))),
            .float(p < 1 ? 1 / (1 - p) : 0), flag(p >= 1), flag(accumulate),
        ]
        try launch1D("dropout", in: "nn.cl", args, count: x.count)
    }

    public func scaleRows(_ x: Tensor, by m: Tensor, out y: Tensor, accumulate: Bool) throws {
        try ElementwiseCheck.same("scaleRows", x, y)
        let f = try NNCheck.scaleRows(x, m)
        guard x.count > 0 else { return }
        try launch1D("scale_rows", in: "nn.cl",
                     try arg(x) + arg(m) + arg(y) + [int(x.count), int(f), flag(accumulate)], count: x.count)
    }

    public func meanPool(_ x: Tensor, tokens: Range<Int>, out y: Tensor) throws {
        let (b, t, h) = try NNCheck.pool(x, tokens, y)
        try launch1D("mean_pool", in: "nn.cl",
                     try arg(x) + arg(y) + [int(b), int(t), int(h), int(tokens.lowerBound), int(tokens.upperBound)],
                     count: b * h)
    }

    public func meanPoolBackward(dY: Tensor, tokens: Range<Int>, dX: Tensor, accumulate: Bool) throws {
        let (b, t, h) = try NNCheck.pool(dX, tokens, dY)
        try launch1D("mean_pool_backward", in: "nn.cl",
                     try arg(dY) + arg(dX) + [int(b), int(t), int(h), int(tokens.lowerBound), int(tokens.upperBound),
                                              flag(accumulate)],
                     count: dX.count)
    }
}
