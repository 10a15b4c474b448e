import Foundation

/// MoE Jetpack's recycling from a wider predecessor (e.g. ViT-S width 384 into a
/// ViT-T width 192): the residual width shrinks by keeping `width` of the
/// predecessor's channels, sampled without replacement with probability
/// proportional to their importance (the L2 norm of the LayerNorm outputs over
/// calibration tokens; without data, the norm of the LayerNorms' weights), and
/// the same channels are kept in every tensor that touches the residual stream.
/// Heads keep their count, so each head's dimension shrinks with the width; the
/// kept query/key and value dimensions of each head are sampled by weight
/// norms. MLPs that stay dense keep the predecessor's MLP ratio (neurons sampled
/// by importance); MLPs that become MoE layers keep every neuron, for the
/// experts to sample from.
///
/// Works on moe-gpu ViT tensor names (timm style: `patch_embed.proj`,
/// `pos_embed`, `blocks.L.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
/// `norm`, `head`).
public struct ViTWidthReduction: Sendable {
    public let oldWidth: Int, width: Int, heads: Int
    /// Kept residual channels, ascending.
    public let channels: [Int]
    /// Per block: kept rows of Q and K (indices in 0..<oldWidth, head by head), and of V.
    public let queryKeyDims: [Int: [Int]]
    public let valueDims: [Int: [Int]]
    /// Per block whose MLP stays dense: the kept hidden neurons.
    public let mlpNeurons: [Int: [Int]]
    /// Queries are multiplied by this (sqrt(new head dim / old)) so the kept
    /// dimensions enter the attention logits at the scale they had.
    public var queryScale: Float { Float((Double(width) / Double(oldWidth)).squareRoot()) }

    /// Plans the reduction of `source` (a dense moe-gpu ViT) to `width` channels.
    /// `channelImportance` (one value per old channel) and `neuronImportance`
    /// (per block, one per hidden neuron) come from calibration data; without
    /// them, weight norms decide. `keepWholeMLPs`: blocks whose MLP becomes an MoE layer.
    public static func plan(source: TensorSource, width: Int, heads: Int, keepWholeMLPs: Set<Int>,
                            channelImportance: [Double]? = nil, neuronImportance: [Int: [Double]] = [:],
                            seed: UInt64) throws -> ViTWidthReduction {
        guard let pe = source.descriptor("patch_embed.proj.weight"), pe.shape.count == 2 else {
            throw CheckpointError(.unsupported, "recycling into a narrower model needs a moe-gpu ViT (no patch_embed.proj.weight in \(source.sourceDescription)); other architectures are not supported yet")
        }
        let old = pe.shape[0]
        guard width >= 1, width <= old else {
            throw CheckpointError(.usage, "the target width \(width) must be between 1 and the source width \(old)")
        }
        guard heads >= 1, old % heads == 0, width % heads == 0 else {
            throw CheckpointError(.usage, "the width \(width) and the source width \(old) must both divide into \(heads) heads")
        }
        let blocks = source.tensors.compactMap { t -> Int? in
            guard t.name.hasPrefix("blocks."), t.name.hasSuffix(".norm1.weight") else { return nil }
            return Int(t.name.dropFirst("blocks.".count).prefix { $0 != "." })
        }.sorted()

        // Residual channels.
        var channelWeights = channelImportance ?? [Double](repeating: 0, count: old)
        if channelImportance == nil {
            for t in source.tensors where t.name.hasSuffix("norm1.weight") || t.name.hasSuffix("norm2.weight") || t.name == "norm.weight"
                || t.name.hasSuffix("norm1.bias") || t.name.hasSuffix("norm2.bias") || t.name == "norm.bias" {
                let v = try source.floats(t.name)
                guard v.count == old else { throw CheckpointError(.format, "\(t.name) has \(v.count) values, expected \(old)") }
                for c in 0..<old { channelWeights[c] += Double(v[c]) * Double(v[c]) }
            }
            channelWeights = channelWeights.map { $0.squareRoot() }
        }
        guard channelWeights.count == old else {
            throw CheckpointError(.usage, "channel importance has \(channelWeights.count) values for \(old) channels")
        }
        var r = rng(seed, 4)
        let channels = ImportanceSampling.sample(weights: channelWeights, count: width, rng: &r).sorted()

        // Per-head dimensions and dense MLP neurons.
        let oldHead = old / heads, newHead = width / heads
        var qk: [Int: [Int]] = [:], v: [Int: [Int]] = [:], neurons: [Int: [Int]] = [:]
        func rowNorm(_ w: [Float], row: Int, cols: Int) -> Double {
            var s = 0.0
            for c in channels { s += Double(w[row * cols + c]) * Double(w[row * cols + c]) }
            return s.squareRoot()
        }
        for l in blocks {
            let qkv = try source.floats("blocks.\(l).attn.qkv.weight"), proj = try source.floats("blocks.\(l).attn.proj.weight")
            guard qkv.count == 3 * old * old, proj.count == old * old else {
                throw CheckpointError(.format, "blocks.\(l).attn has shapes that do not match width \(old)")
            }
            var qkRows: [Int] = [], vRows: [Int] = []
            for h in 0..<heads {
                let dims = Array(h * oldHead..<(h + 1) * oldHead)
                let qkWeights = dims.map { rowNorm(qkv, row: $0, cols: old) * rowNorm(qkv, row: old + $0, cols: old) }
                let vWeights = dims.map { d -> Double in
                    var s = 0.0
                    for c in channels { s += Double(proj[c * old + d]) * Double(proj[c * old + d]) }
                    return rowNorm(qkv, row: 2 * old + d, cols: old) * s.squareRoot()
                }
                var rq = rng(seed, 5, UInt64(l), UInt64(h)), rv = rng(seed, 6, UInt64(l), UInt64(h))
                qkRows += ImportanceSampling.sample(weights: qkWeights, count: newHead, rng: &rq).sorted().map { dims[$0] }
                vRows += ImportanceSampling.sample(weights: vWeights, count: newHead, rng: &rv).sorted().map { dims[$0] }
            }
            qk[l] = qkRows; v[l] = vRows
            guard !keepWholeMLPs.contains(l) else { continue }
            let fc1 = try source.floats("blocks.\(l).mlp.fc1.weight"), fc2 = try source.floats("blocks.\(l).mlp.fc2.weight")
            let hidden = fc1.count / old
            let keep = max(1, hidden * width / old)
            let weights = neuronImportance[l] ?? (0..<hidden).map { n -> Double in
                var s = 0.0
                for c in channels { s += Double(fc2[c * hidden + n]) * Double(fc2[c * hidden + n]) }
                return rowNorm(fc1, row: n, cols: old) * s.squareRoot()
            }
            guard weights.count == hidden else {
                throw CheckpointError(.usage, "neuron importance of block \(l) has \(weights.count) values for \(hidden) neurons")
            }
            var rn = rng(seed, 7, UInt64(l))
            neurons[l] = ImportanceSampling.sample(weights: weights, count: keep, rng: &rn).sorted()
        }
        return ViTWidthReduction(oldWidth: old, width: width, heads: heads, channels: channels, queryKeyDims: qk,
                                 valueDims: v, mlpNeurons: neurons)
    }

    /// The narrowed tensor: `shape` and row-major `values` of the predecessor's tensor `name`.
    public func narrow(_ name: String, shape: [Int], values: [Float]) throws -> (shape: [Int], values: [Float]) {
        try narrow(name, shape: shape, data: values)
    }

    /// The shape `narrow` gives, without reading or copying any data.
    func narrowedShape(_ name: String, shape: [Int]) throws -> [Int] { try narrow(name, shape: shape, data: nil).shape }

    /// `data` nil: the shape only (the values come back empty).
    private func narrow(_ name: String, shape: [Int], data values: [Float]?) throws -> (shape: [Int], values: [Float]) {
        let W = oldWidth, all = Array(0..<W)
        func block() -> Int? {
            guard name.hasPrefix("blocks.") else { return nil }
            return Int(name.dropFirst("blocks.".count).prefix { $0 != "." })
        }
        /// values[rows, cols] of a row-major [R, C] matrix, scaled by `scale(row)`.
        func take(rows: [Int], cols: [Int], C: Int, scale: (Int) -> Float = { _ in 1 }) -> [Float] {
            guard let values else { return [] }
            var out = [Float](); out.reserveCapacity(rows.count * cols.count)
            for r in rows { let s = scale(r); for c in cols { out.append(values[r * C + c] * s) } }
            return out
        }
        /// values[indices] of a vector, scaled by `scale(index)`.
        func pick(_ indices: [Int], scale: (Int) -> Float = { _ in 1 }) -> [Float] {
            guard let values else { return [] }
            return indices.map { values[$0] * scale($0) }
        }
        let leaf = block().map { name.dropFirst("blocks.\($0).".count) }.map(String.init)
        let l = block() ?? -1
        switch (leaf, shape.count) {
        case (nil, _) where name == "patch_embed.proj.weight" && shape.count == 2:
            return ([width, shape[1]], take(rows: channels, cols: Array(0..<shape[1]), C: shape[1]))
        case (nil, 1) where ["patch_embed.proj.bias", "norm.weight", "norm.bias"].contains(name):
            return ([width], pick(channels))
        case (nil, 2) where name == "pos_embed" || name == "head.weight":
            return ([shape[0], width], take(rows: Array(0..<shape[0]), cols: channels, C: W))
        case (nil, 1) where name == "head.bias":
            return (shape, values ?? [])
        case (let leaf?, 1) where ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"].contains(leaf):
            return ([width], pick(channels))
        case ("attn.qkv.weight"?, 2), ("attn.qkv.bias"?, 1):
            let rows = queryKeyDims[l]! + queryKeyDims[l]!.map { W + $0 } + valueDims[l]!.map { 2 * W + $0 }
            let scale: (Int) -> Float = { $0 < W ? queryScale : 1 }
            if shape.count == 1 { return ([3 * width], pick(rows, scale: scale)) }
            return ([3 * width, width], take(rows: rows, cols: channels, C: W, scale: scale))
        case ("attn.proj.weight"?, 2):
            return ([width, width], take(rows: channels, cols: valueDims[l]!, C: W))
        case ("mlp.fc1.weight"?, 2):
            let keep = mlpNeurons[l] ?? Array(0..<shape[0])
            return ([keep.count, width], take(rows: keep, cols: channels, C: W))
        case ("mlp.fc1.bias"?, 1):
            let keep = mlpNeurons[l] ?? Array(0..<shape[0])
            return ([keep.count], pick(keep))
        case ("mlp.fc2.weight"?, 2):
            let keep = mlpNeurons[l] ?? Array(0..<shape[1])
            return ([width, keep.count], take(rows: channels, cols: keep, C: shape[1]))
        default:
            if !shape.contains(W) || W == width && all == channels { return (shape, values ?? []) }
            throw CheckpointError(.unsupported, "cannot narrow \(name) \(shape): recycling into a narrower model knows the moe-gpu ViT's tensors only")
        }
    }
}

/// A dense checkpoint seen through a width reduction: the tensors a narrower
/// model of the same depth would have (read and narrowed on demand).
public final class NarrowedSource: TensorSource {
    public let base: TensorSource
    public let reduction: ViTWidthReduction
    public let tensors: [TensorDescriptor]
    public var sourceDescription: String { "\(base.sourceDescription) narrowed to width \(reduction.width)" }
    public var metadata: [String: String] { base.metadata }
    public var directory: URL { base.directory }

    public init(_ base: TensorSource, _ reduction: ViTWidthReduction) throws {
        self.base = base; self.reduction = reduction
        tensors = try base.tensors.map { t in
            let s = try reduction.narrowedShape(t.name, shape: t.shape)
            return TensorDescriptor(name: t.name, dtypeName: "F32", shape: s)
        }
    }

    public func descriptor(_ name: String) -> TensorDescriptor? { tensors.first { $0.name == name } }
    public func floats(_ name: String) throws -> [Float] {
        guard let t = base.descriptor(name) else { throw CheckpointError(.format, "no tensor \(name)") }
        return try reduction.narrow(name, shape: t.shape, values: try base.floats(name)).values
    }
    public func passthrough(_ name: String) -> (StorageDType, UnsafeRawBufferPointer)? { nil }
    public func releasePages(_ name: String) { base.releasePages(name) }
}
