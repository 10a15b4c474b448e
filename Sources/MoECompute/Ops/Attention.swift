import Foundation

/// The shape and memory layout of one fused attention call.
///
/// Element `c` of head `h` of token `t` of batch `b` lives at
/// `b * batchStrideX + t * ldX + h * headDim + c` (elements, from the tensor's
/// own offset) for X in Q, K, V, O; dQ, dK, dV and dO use the layouts of Q, K,
/// V and O. So Q, K and V can be views into one packed projection
/// `[B, T, (Hq + 2 Hkv) d]` (see `packedQKV` and `views(ofPacked:)`) and O a plain
/// `[B, T, Hq d]` buffer: no transposes.
public struct AttentionConfig: Sendable, Equatable {
    public var batch: Int
    public var queryHeads: Int
    /// Divides `queryHeads` (grouped-query attention): query head `h` uses kv
    /// head `h / (queryHeads / kvHeads)`.
    public var kvHeads: Int
    /// Tq.
    public var queryLength: Int
    /// Tk; may differ from Tq (decoding with a KV cache).
    public var keyLength: Int
    public var headDim: Int
    /// Query `i` sits at absolute position `Tk - Tq + i` and sees keys `j <= Tk - Tq + i`.
    /// With `Tk >= Tq` every query sees at least one key; with `Tk < Tq` the first
    /// `Tq - Tk` queries see none and get `O = 0`, `logSumExp = -inf`, `dQ = 0`.
    public var causal: Bool
    /// Multiplies the scores before the softmax, usually `1/sqrt(headDim)`.
    public var scale: Float
    /// Row strides (elements between tokens) of Q, K, V, O.
    public var ldq: Int, ldk: Int, ldv: Int, ldo: Int
    /// Elements between batches of Q, K, V, O (a KV cache passes its capacity * ld).
    public var batchStrideQ: Int, batchStrideK: Int, batchStrideV: Int, batchStrideO: Int

    /// Defaults: `kvHeads = queryHeads`, `keyLength = queryLength`, not causal,
    /// `scale = 1/sqrt(headDim)`, packed rows (`ld = heads * headDim`) and packed
    /// batches (`batchStride = T * ld`).
    public init(batch: Int, queryHeads: Int, kvHeads: Int? = nil, queryLength: Int, keyLength: Int? = nil,
                headDim: Int, causal: Bool = false, scale: Float? = nil,
                ldq: Int? = nil, ldk: Int? = nil, ldv: Int? = nil, ldo: Int? = nil,
                batchStrideQ: Int? = nil, batchStrideK: Int? = nil, batchStrideV: Int? = nil, batchStrideO: Int? = nil) {
        self.batch = batch; self.queryHeads = queryHeads; self.kvHeads = kvHeads ?? queryHeads
        self.queryLength = queryLength; self.keyLength = keyLength ?? queryLength
        self.headDim = headDim; self.causal = causal
        self.scale = scale ?? 1 / Float(max(headDim, 1)).squareRoot()
        self.ldq = ldq ?? queryHeads * headDim
        self.ldk = ldk ?? self.kvHeads * headDim
        self.ldv = ldv ?? self.kvHeads * headDim
        self.ldo = ldo ?? queryHeads * headDim
        self.batchStrideQ = batchStrideQ ?? self.queryLength * self.ldq
        self.batchStrideK = batchStrideK ?? self.keyLength * self.ldk
        self.batchStrideV = batchStrideV ?? self.keyLength * self.ldv
        self.batchStrideO = batchStrideO ?? self.queryLength * self.ldo
    }

    /// Self-attention over one packed projection `qkv: [B, T, (Hq + 2 Hkv) d]`
    /// (Q heads, then K heads, then V heads in each row; `views(ofPacked:)` cuts
    /// the three views) with the output a packed `[B, T, Hq d]`.
    public static func packedQKV(batch: Int, queryHeads: Int, kvHeads: Int? = nil, tokens: Int, headDim: Int,
                                 causal: Bool = false, scale: Float? = nil) -> AttentionConfig {
        let hkv = kvHeads ?? queryHeads
        let ld = (queryHeads + 2 * hkv) * headDim
        return AttentionConfig(batch: batch, queryHeads: queryHeads, kvHeads: hkv, queryLength: tokens, keyLength: tokens,
                               headDim: headDim, causal: causal, scale: scale, ldq: ld, ldk: ld, ldv: ld,
                               batchStrideQ: tokens * ld, batchStrideK: tokens * ld, batchStrideV: tokens * ld)
    }

    /// Q, K, V views of a packed projection laid out as `packedQKV` describes
    /// (also gives dQ, dK, dV views of its gradient).
    public func views(ofPacked qkv: Tensor) throws -> (q: Tensor, k: Tensor, v: Tensor) {
        let qd = queryHeads * headDim, kd = kvHeads * headDim
        func view(_ offset: Int, _ extent: Int) throws -> Tensor {
            try qkv.view(offset: extent == 0 ? 0 : offset, shape: [extent])
        }
        return (try view(0, extentQ), try view(qd, extentK), try view(qd + kd, extentV))
    }

    /// Query rows that see at least one key, and the keys query `i` sees: `0..<visibleKeys(i)`.
    @inline(__always)
    public func visibleKeys(_ i: Int) -> Int {
        causal ? min(keyLength, max(0, keyLength - queryLength + i + 1)) : keyLength
    }

    /// Forward FLOPs: 2 multiply-adds (`Q K^T` and `P V`) of `headDim` each per
    /// visible (query, key) pair, times 2 per multiply-add:
    /// `4 * B * Hq * d * pairs`, `pairs = Tq * Tk` without the mask and the exact
    /// count of unmasked pairs (about half) with it. Softmax exps not counted;
    /// the backward is about 2.5x this (5 products per pair).
    public var flops: Double {
        var pairs = Double(queryLength) * Double(keyLength)
        if causal {
            pairs = 0
            for i in 0..<queryLength { pairs += Double(visibleKeys(i)) }
        }
        return 4 * Double(batch) * Double(queryHeads) * Double(headDim) * pairs
    }

    /// Elements a tensor in each layout must hold: one past the last element
    /// touched (0 when nothing is).
    func extent(rows: Int, ld: Int, batchStride: Int, heads: Int) -> Int {
        batch == 0 || rows == 0 ? 0 : (batch - 1) * batchStride + (rows - 1) * ld + heads * headDim
    }
    public var extentQ: Int { extent(rows: queryLength, ld: ldq, batchStride: batchStrideQ, heads: queryHeads) }
    public var extentK: Int { extent(rows: keyLength, ld: ldk, batchStride: batchStrideK, heads: kvHeads) }
    public var extentV: Int { extent(rows: keyLength, ld: ldv, batchStride: batchStrideV, heads: kvHeads) }
    public var extentO: Int { extent(rows: queryLength, ld: ldo, batchStride: batchStrideO, heads: queryHeads) }
    /// Query heads per kv head.
    var group: Int { queryHeads / kvHeads }
}

/// Fused multi-head attention (flash-style: scores, scaled softmax and the
/// weighted sum in one pass, the probabilities never stored).
public protocol AttentionOps: AnyObject {
    /// `out = softmax(scale * Q K^T (+ causal mask)) V` per (batch, query head).
    ///
    /// `logSumExp: [batch, queryHeads, Tq]` (f32, index `(b * Hq + h) * Tq + i`) gets
    /// `L_i = log(sum_{j visible} exp(scale * q_i . k_j))` (natural log, of the
    /// scaled scores, computed max-subtracted), so that the backward recovers the
    /// probabilities as `P_ij = exp(scale * q_i . k_j - L_i)`. `-inf` for a query that
    /// sees no key (causal with `Tk < Tq`, or `Tk == 0`); its output row is 0.
    /// `out` and `logSumExp` must not overlap `q`, `k`, `v` or each other.
    func attention(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor) throws

    /// From `dOut` (layout of `out`) and the forward's `out` and `logSumExp`:
    /// writes (overwrites) `dQ`, `dK`, `dV` in the layouts of `q`, `k`, `v`, touching
    /// only the columns of their heads (they may be views into one packed gradient
    /// buffer). `dK`/`dV` of a kv head sum over the query heads of its group; keys no
    /// query sees get 0. The gradients must not overlap any input.
    func attentionBackward(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor,
                           dOut: Tensor, dQ: Tensor, dK: Tensor, dV: Tensor) throws
}

/// Argument checks shared by both backends (one-line `ShapeError`s).
enum AttentionCheck {
    static func config(_ op: String, _ c: AttentionConfig) throws {
        try require(c.batch >= 0 && c.queryLength >= 0 && c.keyLength >= 0,
                    "\(op): batch and lengths must be >= 0, got B=\(c.batch) Tq=\(c.queryLength) Tk=\(c.keyLength)")
        try require(c.queryHeads > 0 && c.kvHeads > 0 && c.headDim > 0,
                    "\(op): heads and head dim must be positive, got Hq=\(c.queryHeads) Hkv=\(c.kvHeads) d=\(c.headDim)")
        try require(c.queryHeads % c.kvHeads == 0, "\(op): kvHeads \(c.kvHeads) does not divide queryHeads \(c.queryHeads)")
        try require(c.scale.isFinite, "\(op): scale must be finite, got \(c.scale)")
        let d = c.headDim
        for (name, ld, heads, stride, rows) in [("q", c.ldq, c.queryHeads, c.batchStrideQ, c.queryLength),
                                                ("k", c.ldk, c.kvHeads, c.batchStrideK, c.keyLength),
                                                ("v", c.ldv, c.kvHeads, c.batchStrideV, c.keyLength),
                                                ("o", c.ldo, c.queryHeads, c.batchStrideO, c.queryLength)] {
            try require(ld >= heads * d, "\(op): ld\(name) \(ld) < heads * headDim = \(heads * d)")
            // Batches must not overlap (rows of an output would be written twice).
            try require(c.batch <= 1 || rows == 0 || stride >= (rows - 1) * ld + heads * d,
                        "\(op): batch stride of \(name) \(stride) overlaps the previous batch (\(rows) rows of ld \(ld))")
        }
    }

    static func tensor(_ op: String, _ name: String, _ t: Tensor, extent: Int) throws {
        try require(t.dtype == .f32, "\(op): \(name) must be f32, got \(t.dtype)")
        try require(t.count >= extent, "\(op): \(name) \(t.shape) holds \(t.count) elements, the layout needs \(extent)")
        try require(t.offset + t.count < Int(Int32.max), "\(op): \(name): tensors over 2^31 elements are not supported")
    }

    /// Whether two tensors share storage and their element ranges intersect.
    static func overlap(_ a: Tensor, _ b: Tensor) -> Bool {
        guard a.count > 0, b.count > 0 else { return false }
        let same: Bool
        switch (a.storage, b.storage) {
        case (.host(let x), .host(let y)): same = x === y
        case (.device(let x), .device(let y)): same = x === y
        default: same = false
        }
        return same && a.offset < b.offset + b.count && b.offset < a.offset + a.count
    }

    static func disjoint(_ op: String, _ outputs: [(String, Tensor)], from inputs: [(String, Tensor)]) throws {
        for (on, o) in outputs {
            for (iname, i) in inputs {
                try require(!overlap(o, i), "\(op): \(on) overlaps \(iname) (outputs must not alias inputs)")
            }
        }
    }

    static func forward(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor) throws {
        try forwardTensors("attention", c, q: q, k: k, v: v, out: out, logSumExp: logSumExp)
    }

    /// The forward's tensors (also the backward's inputs): sizes and no aliasing.
    private static func forwardTensors(_ op: String, _ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                       logSumExp: Tensor) throws {
        try config(op, c)
        try tensor(op, "q", q, extent: c.extentQ)
        try tensor(op, "k", k, extent: c.extentK)
        try tensor(op, "v", v, extent: c.extentV)
        try tensor(op, "out", out, extent: c.extentO)
        try tensor(op, "logSumExp", logSumExp, extent: c.batch * c.queryHeads * c.queryLength)
        try disjoint(op, [("out", out), ("logSumExp", logSumExp)], from: [("q", q), ("k", k), ("v", v)])
        try disjoint(op, [("out", out)], from: [("logSumExp", logSumExp)])
    }

    static func backward(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor,
                         dOut: Tensor, dQ: Tensor, dK: Tensor, dV: Tensor) throws {
        let op = "attentionBackward"
        try forwardTensors(op, c, q: q, k: k, v: v, out: out, logSumExp: logSumExp)
        try tensor(op, "dOut", dOut, extent: c.extentO)
        try tensor(op, "dQ", dQ, extent: c.extentQ)
        try tensor(op, "dK", dK, extent: c.extentK)
        try tensor(op, "dV", dV, extent: c.extentV)
        // dQ, dK, dV may share one buffer (disjoint columns) but no input.
        try disjoint(op, [("dQ", dQ), ("dK", dK), ("dV", dV)],
                     from: [("q", q), ("k", k), ("v", v), ("out", out), ("logSumExp", logSumExp), ("dOut", dOut)])
    }
}
