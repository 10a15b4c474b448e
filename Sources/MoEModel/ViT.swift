import Foundation
import MoECheckpoint
import MoECompute

/// What a model is: a plain, readable config saved next to every checkpoint.
public struct ViTConfig: Codable, Equatable, Sendable {
    public var imageSize = 28
    public var channels = 1
    public var patchSize = 7
    public var width = 64
    public var depth = 4
    public var heads = 4
    public var mlpRatio = 4
    public var classes = 10
    /// "mean" pooling over patch tokens, or "cls": a learnable class token.
    public var pool = "mean"
    /// Which blocks have an MoE layer instead of the dense MLP (empty: a dense model).
    public var moeBlocks: [Int] = []
    public var moe: MoEConfig?

    public init() {}

    public var patches: Int { (imageSize / patchSize) * (imageSize / patchSize) }
    public var patchDim: Int { patchSize * patchSize * channels }
    public var tokens: Int { patches + (pool == "cls" ? 1 : 0) }
    public var hidden: Int { width * mlpRatio }

    func validate() throws {
        try check(imageSize > 0 && patchSize > 0 && imageSize % patchSize == 0, "imageSize \(imageSize) must be a multiple of patchSize \(patchSize)")
        try check(width > 0 && heads > 0, "width \(width) and heads \(heads) must be at least 1")
        try check(width % heads == 0, "width \(width) must be a multiple of heads \(heads)")
        try check(depth > 0 && mlpRatio > 0 && classes > 1 && channels > 0, "depth, mlpRatio, channels must be positive and classes > 1")
        try check(pool == "mean" || pool == "cls", "pool must be \"mean\" or \"cls\", got \"\(pool)\"")
        try check(moeBlocks.allSatisfy { (0..<depth).contains($0) }, "moeBlocks \(moeBlocks) must be in 0..<\(depth)")
        if !moeBlocks.isEmpty {
            guard let moe else { throw ModelError.badConfig("moeBlocks is set but moe is missing") }
            try moe.validate()
        }
    }
}

/// The MoE layer's routing and experts.
public struct MoEConfig: Codable, Equatable, Sendable {
    /// "topk" (token choice), "expert-choice", "soft" (Soft MoE, dot-product) or "sphero" (SpheroMoE, cosine).
    public var router = "sphero"
    public var experts = 8
    public var topK = 2
    /// "softmax-topk" or "topk-softmax".
    public var gateOrder = "softmax-topk"
    public var renormalize = true
    /// Tokens per expert = ceil(T*k/E * factor); nil: dropless. For expert choice: ceil(factor * T / E).
    public var capacityFactor: Double? = nil
    /// "position" or "probs".
    public var dropPolicy = "position"
    /// Multiplicative router jitter epsilon (0: none).
    public var jitter: Float = 0
    public var auxLossCoefficient: Float = 0.01
    public var zLossCoefficient: Float = 0.001
    /// Expert hidden width as a fraction of the dense MLP's (recycled experts are narrower).
    public var expertWidthRatio: Double = 1
    public var dropout: Float = 0
    /// SpheroMoE / Soft MoE: slots each expert owns.
    public var slotsPerExpert = 1
    /// SpheroMoE: experts at full width; the rest are universal experts.
    public var coreExperts = 0
    /// SpheroMoE: universal experts' width as a fraction of the core width.
    public var universalWidthRatio: Double = 0.25
    public var temperatureInit: Float = 0.5
    /// Std of Gaussian noise on the routing logits while training (SpheroMoE; nil: 1/slots).
    public var logitNoise: Float? = nil
    /// Stochastic depth on the MoE branch (drop probability per sample).
    public var stochasticDepth: Float = 0

    public init() {}

    func validate() throws {
        try check(["topk", "expert-choice", "soft", "sphero"].contains(router),
                  "unknown router \"\(router)\": use topk, expert-choice, soft or sphero")
        try check(experts >= 1, "experts must be at least 1")
        try check(topK >= 1 && topK <= experts, "topK \(topK) must be in 1...\(experts)")
        try check(["softmax-topk", "topk-softmax"].contains(gateOrder), "gateOrder must be softmax-topk or topk-softmax")
        try check(["position", "probs"].contains(dropPolicy), "dropPolicy must be position or probs")
        try check(capacityFactor.map { $0 > 0 } ?? true, "capacityFactor must be positive")
        try check(expertWidthRatio > 0 && universalWidthRatio > 0, "width ratios must be positive")
        try check(coreExperts >= 0 && coreExperts <= experts, "coreExperts must be in 0...\(experts)")
        try check(slotsPerExpert >= 1, "slotsPerExpert must be at least 1")
        try check(dropout >= 0 && dropout < 1 && stochasticDepth >= 0 && stochasticDepth < 1, "dropout and stochasticDepth must be in [0, 1)")
        try check(temperatureInit > 0, "temperatureInit must be positive")
    }
}

extension RouterKind {
    /// The router a validated MoE config trains: the name its checkpoints carry in
    /// `moe-gpu.router` (`router: "topk"` with `gateOrder: "softmax-topk",
    /// renormalize: true` is `topk-softmax`, the same function).
    public init(moe c: MoEConfig) {
        guard let kind = RouterKind(trainingRouter: c.router, gateOrder: c.gateOrder, renormalize: c.renormalize) else {
            preconditionFailure("MoE config with router \(c.router), gate order \(c.gateOrder) was not validated")
        }
        self = kind
    }
}

extension MoEConfig {
    /// `RouterKind(moe: self).rawValue`: the name `moe-gpu.router` records for this config.
    public var routerName: String { RouterKind(moe: self).rawValue }

    /// The capacity factor the layer routes with (expert choice defaults to
    /// `RouterKind.defaultExpertChoiceCapacityFactor`), 0 for dropless: what `moe-gpu.capacity_factor` records.
    public var effectiveCapacityFactor: Double {
        capacityFactor ?? (RouterKind(moe: self).isExpertChoice ? RouterKind.defaultExpertChoiceCapacityFactor : 0)
    }
}

/// Throws `ModelError.badConfig(message)` unless `ok`: the one check every config's `validate` uses.
func check(_ ok: Bool, _ message: @autoclosure () -> String) throws {
    if !ok { throw ModelError.badConfig(message()) }
}

public enum ModelError: Error, CustomStringConvertible {
    case badConfig(String)
    case badInput(String)
    /// A file or folder that cannot be written or read (the message names it and the way out).
    case io(String)
    public var description: String {
        // One line whatever the file held (keys and names are quoted from it).
        switch self {
        case .badConfig(let m): return "invalid model config: \(m.escapingControlCharacters)"
        case .badInput(let m): return "invalid model input: \(m.escapingControlCharacters)"
        case .io(let m): return m.escapingControlCharacters
        }
    }

    /// The POSIX reason inside a Foundation file error ("Permission denied"), else its description.
    static func reason(_ error: Error) -> String {
        let ns = error as NSError
        if let underlying = ns.userInfo[NSUnderlyingErrorKey] as? NSError, underlying.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(underlying.code)))
        }
        return ns.localizedDescription
    }
}

/// A pre-norm transformer block: `mid = x + attn(LN1(x))`, `out = mid + ffn(LN2(mid))`.
/// The block keeps its input, `mid` and `out` for the backward (no copies of
/// the residual stream), and each residual add is one launch.
final class Block {
    let ln1: LayerNormLayer, ln2: LayerNormLayer
    let attention: Attention
    let ffn: FeedForward
    let stochasticDepth: Float
    let ws: Workspace
    let index: Int

    init(_ store: ParameterStore, index: Int, config: ViTConfig) throws {
        let name = "blocks.\(index)"
        self.index = index
        ln1 = try LayerNormLayer(store, "\(name).norm1", features: config.width)
        attention = try Attention(store, "\(name).attn", width: config.width, heads: config.heads)
        ln2 = try LayerNormLayer(store, "\(name).norm2", features: config.width)
        if config.moeBlocks.contains(index), let moe = config.moe {
            ffn = try makeMoE(store, "\(name).moe", width: config.width, hidden: config.hidden, tokens: config.tokens, config: moe)
            stochasticDepth = moe.stochasticDepth
        } else {
            ffn = try DenseMLP(store, "\(name).mlp", width: config.width, hidden: config.hidden)
            stochasticDepth = 0
        }
        ws = Workspace(backend: store.backend)
    }

    private var depthMask: Tensor?
    private var input: Tensor?

    /// x: [B*T, D], the block input (kept unchanged for the backward); returns the output.
    func forward(_ x: Tensor, batch: Int, tokens: Int, training: Bool, step: Int, seed: UInt64) throws -> Tensor {
        let b = x.backend, rows = batch * tokens, d = x.shape.last!
        input = x
        let n1 = try ws.get("n1", [rows, d])
        try ln1.forward(x, into: n1, mean: try ws.get("m1", [rows]), rstd: try ws.get("r1", [rows]))
        let attnOut = try ws.get("attnOut", [rows, d])
        try attention.forward(n1, batch: batch, tokens: tokens, into: attnOut)
        let mid = try ws.get("mid", [rows, d])
        try b.add(x, attnOut, into: mid)
        let n2 = try ws.get("n2", [rows, d])
        try ln2.forward(mid, into: n2, mean: try ws.get("m2", [rows]), rstd: try ws.get("r2", [rows]))
        let ffnOut = try ws.get("ffnOut", [rows, d])
        try ffn.forward(n2, batch: batch, tokens: tokens, into: ffnOut, training: training, step: step)
        depthMask = nil
        if training && stochasticDepth > 0 {
            // One keep/drop draw per sample, scaled by 1/keep: dropout of a ones
            // vector, from the device's counter hash (nothing uploaded).
            let ones = try ws.get("depthOnes", [batch]), mask = try ws.get("depthMask", [batch])
            try b.fill(ones, value: 1)
            try b.dropout(ones, p: stochasticDepth, seed: seed ^ (UInt64(index) &* 0x9E37_79B9_7F4A_7C15), out: mask, accumulate: false)
            try b.scaleRows(ffnOut, by: mask, out: ffnOut, accumulate: false)
            depthMask = mask
        }
        let out = try ws.get("out", [rows, d])
        try b.add(mid, ffnOut, into: out)
        return out
    }

    /// dX: [B*T, D], the gradient of the block output, replaced in place by the input's.
    func backward(_ dX: Tensor, batch: Int, tokens: Int, lossScale: Float) throws {
        guard let input else { throw ShapeError("block backward called before forward") }
        let rows = batch * tokens, d = dX.shape.last!
        // Through the FFN branch: dX += LN2'(ffn'(dX)).
        var dFfn = dX
        if let mask = depthMask {
            dFfn = try ws.get("dFfn", [rows, d])
            try dX.backend.scaleRows(dX, by: mask, out: dFfn, accumulate: false)
        }
        let dN2 = try ws.get("dN2", [rows, d])
        try ffn.backward(dOut: dFfn, x: try ws.get("n2", [rows, d]), batch: batch, tokens: tokens, dX: dN2, lossScale: lossScale)
        try ln2.backward(dY: dN2, x: try ws.get("mid", [rows, d]), mean: try ws.get("m2", [rows]), rstd: try ws.get("r2", [rows]), dX: dX)
        // Through attention: dX += LN1'(attn'(dX)).
        let dN1 = try ws.get("dN1", [rows, d])
        try attention.backward(dOut: dX, x: try ws.get("n1", [rows, d]), batch: batch, tokens: tokens, dX: dN1)
        try ln1.backward(dY: dN1, x: input, mean: try ws.get("m1", [rows]), rstd: try ws.get("r1", [rows]), dX: dX)
    }
}

func makeMoE(_ store: ParameterStore, _ name: String, width: Int, hidden: Int, tokens: Int, config c: MoEConfig) throws -> FeedForward {
    let expertHidden = max(1, Int((Double(hidden) * c.expertWidthRatio).rounded()))
    switch RouterKind(moe: c) {
    case .topkSoftmax, .softmaxTopk:
        let gate = GateConfig(k: c.topK, mode: c.gateOrder == "topk-softmax" ? .topKThenSoftmax : .softmaxThenTopK,
                              renormalize: c.renormalize, jitter: c.jitter > 0 ? GateJitter(epsilon: c.jitter, seed: 0) : nil)
        let dispatch = DispatchConfig(experts: c.experts, capacity: c.capacityFactor.map { .factor($0) } ?? .dropless,
                                      dropPolicy: c.dropPolicy == "probs" ? .probs : .position)
        return try MoELayer(store, name, width: width, hidden: expertHidden, experts: c.experts,
                            routing: .topK(gate: gate, dispatch: dispatch), auxCoefficient: c.auxLossCoefficient,
                            zCoefficient: c.zLossCoefficient, experts: .mlp(.geluErf), dropout: c.dropout)
    case .expertChoice:
        return try MoELayer(store, name, width: width, hidden: expertHidden, experts: c.experts,
                            routing: .expertChoice(capacityFactor: c.effectiveCapacityFactor), auxCoefficient: 0,
                            zCoefficient: c.zLossCoefficient, experts: .mlp(.geluErf), dropout: c.dropout)
    case .soft, .sphero:
        return try SoftMoELayer(store, name, width: width, hidden: expertHidden, tokens: tokens, config: c)
    }
}

/// Vision transformer: patch embedding, position embedding, pre-norm blocks,
/// final LayerNorm, pooling, linear head, cross-entropy with label smoothing.
public final class ViT: Model {
    public let config: ViTConfig
    public let params: ParameterStore
    public var backend: Backend { params.backend }
    let patchEmbed: Linear
    let position: Parameter
    let blocks: [Block]
    let norm: LayerNormLayer
    let head: Linear
    let ws: Workspace

    /// `training: false` builds an inference-only model: no gradient buffer (and no optimiser state).
    public init(config: ViTConfig, backend: Backend, seed: UInt64, training: Bool = true) throws {
        try config.validate()
        self.config = config
        let store = ParameterStore(backend: backend, seed: seed, training: training, deferGradients: true)
        params = store
        patchEmbed = try Linear(store, "patch_embed.proj", in: config.patchDim, out: config.width)
        // The class token, when used, is row 0 of the position table (cls + pos[0] is one free vector).
        position = try store.make("pos_embed", [config.tokens, config.width], .normal(std: 0.02), decays: false)
        blocks = try (0..<config.depth).map { try Block(store, index: $0, config: config) }
        norm = try LayerNormLayer(store, "norm", features: config.width)
        head = try Linear(store, "head", in: config.width, out: config.classes)
        ws = Workspace(backend: backend)
        try store.finalize()
    }

    public var tokensPerExample: Int { config.tokens }
    public var activeParameterCount: Double { LayerBenchmark.activeParameters(self) }

    private var lastBatch = 0
    /// The last block's output of the last forward.
    private var top: Tensor?

    public func forward(_ inputs: Tensor, training: Bool, step: Int) throws -> Tensor {
        try forward(patches: inputs, training: training, step: step)
    }

    /// Forward to logits [B, classes]. `patches` is `[B, tokens, patchDim]`
    /// (`ImageBatchSource` or `Patchify` writes it): with a class token, row 0
    /// of each image is the class-token slot and must be zero, so one GEMM
    /// embeds every row and the class row gets only its position vector.
    @discardableResult
    public func forward(patches: Tensor, training: Bool, step: Int) throws -> Tensor {
        let b = backend, c = config, t = c.tokens
        guard patches.rank == 3, patches.shape[1] == t, patches.shape[2] == c.patchDim else {
            throw ModelError.badInput("patches must be [B, \(t), \(c.patchDim)]\(c.pool == "cls" ? " (a zero class-token row, then the patches)" : ""), got \(patches.shape)")
        }
        let batch = patches.shape[0], rows = batch * t
        lastBatch = batch
        let x = try ws.get("x", [batch, t, c.width])
        if c.pool == "cls" {
            // x = P W^T + pos', pos' = pos with the patch bias on rows 1..: the bias skips the class row.
            try b.gemm(Gemm(m: rows, n: c.width, k: c.patchDim, transB: true), patches, patchEmbed.weight.value, x)
            let posEff = try ws.get("posEff", [t, c.width])
            try b.copy(position.value, to: posEff)
            try b.addBroadcast(patchEmbed.bias!.value, to: try posEff.view(offset: c.width, shape: [t - 1, c.width]))
            try b.addBroadcast(posEff, to: x)
        } else {
            try patchEmbed.forward(patches, rows: rows, into: x)
            try b.addBroadcast(position.value, to: x)
        }
        let seed = params.seed ^ UInt64(step)
        var h = try x.reshaped([rows, c.width])
        for block in blocks { h = try block.forward(h, batch: batch, tokens: t, training: training, step: step, seed: seed) }
        top = h
        let normed = try ws.get("normed", [batch, t, c.width])
        try norm.forward(h, into: normed, mean: try ws.get("nm", [rows]), rstd: try ws.get("nr", [rows]))
        let pooled = try ws.get("pooled", [batch, c.width])
        try b.meanPool(normed, tokens: poolRange, out: pooled)
        let logits = try ws.get("logits", [batch, c.classes])
        try head.forward(pooled, rows: batch, into: logits)
        return logits
    }

    var poolRange: Range<Int> { config.pool == "cls" ? 0..<1 : 0..<config.tokens }

    public func backward(dLogits: Tensor, inputs: Tensor, lossScale: Float) throws {
        let b = backend, c = config, batch = lastBatch, t = c.tokens, rows = batch * t
        let pooled = try ws.get("pooled", [batch, c.width]), dPooled = try ws.get("dPooled", [batch, c.width])
        try head.backward(dY: dLogits, x: pooled, rows: batch, dX: dPooled)
        let dNormed = try ws.get("dNormed", [batch, t, c.width])
        try b.meanPoolBackward(dY: dPooled, tokens: poolRange, dX: dNormed, accumulate: false)
        guard let top else { throw ModelError.badInput("backward called before forward") }
        let dX = try ws.get("dX", [batch, t, c.width])
        try b.fill(dX, value: 0)
        try norm.backward(dY: dNormed, x: top, mean: try ws.get("nm", [rows]), rstd: try ws.get("nr", [rows]), dX: dX)
        let dRows = try dX.reshaped([rows, c.width])
        for block in blocks.reversed() { try block.backward(dRows, batch: batch, tokens: t, lossScale: lossScale) }
        if c.pool == "cls" {
            // dpos = sum over images; the bias gets the position gradient of the patch rows.
            let dPos = try ws.get("dPos", [t, c.width])
            try b.sumRows(dX, into: dPos, accumulate: false)
            try b.axpy(1, dPos, try position.gradient())
            if let dBias = patchEmbed.bias?.grad {
                try b.sumRows(try dPos.view(offset: c.width, shape: [t - 1, c.width]), into: dBias, accumulate: true)
            }
            if let dW = patchEmbed.weight.grad {
                try b.gemm(Gemm(m: c.width, n: c.patchDim, k: rows, transA: true, beta: 1), dRows, inputs, dW)
            }
        } else {
            try b.sumRows(dX, into: try position.gradient(), accumulate: true)
            try patchEmbed.backward(dY: dRows, x: inputs, rows: rows, dX: nil)
        }
    }

    /// Backward from dLogits [B, classes] (weight 1 on the auxiliary losses).
    public func backward(dLogits: Tensor, patches: Tensor) throws {
        try backward(dLogits: dLogits, inputs: patches, lossScale: 1)
    }

    public var routedLayers: [(name: String, layer: RoutedLayer)] {
        blocks.compactMap { block in (block.ffn as? RoutedLayer).map { ("blocks.\(block.index)", $0) } }
    }

    public var checkpointMetadata: [String: String] {
        get throws {
            var metadata: [String: String] = [:]
            metadata[ModelCheckpoint.configKey] = String(decoding: try JSONEncoder.sorted.encode(config), as: UTF8.self)
            metadata["moe-gpu.format"] = config.moeBlocks.isEmpty ? "dense" : "moe"
            if let moe = config.moe, !config.moeBlocks.isEmpty {
                // The one router name (RouterKind) that upcycle, verify and inspect read.
                metadata["moe-gpu.router"] = moe.routerName
                metadata["moe-gpu.num_experts"] = "\(moe.experts)"
                metadata["moe-gpu.capacity_factor"] = "\(moe.effectiveCapacityFactor)"   // 0: dropless
                metadata["moe-gpu.activation"] = "gelu"
                metadata["moe-gpu.sphero_tau"] = "\(moe.temperatureInit)"
                metadata["moe-gpu.top_k"] = "\(moe.topK)"
                metadata["moe-gpu.moe_layers"] = config.moeBlocks.map(String.init).joined(separator: ",")
            }
            return metadata
        }
    }

    /// The per-layer expert loads of the last forward (one read per layer: for tests and tools).
    public func expertLoads() throws -> [String: [Int]] {
        var load: [String: [Int]] = [:]
        for (name, layer) in routedLayers where layer.loadCount > 0 {
            if let c = layer.expertCounts { load[name] = try c.ints().map(Int.init) }
        }
        return load
    }

    /// Auxiliary losses of the last forward, recomputed and summed over the MoE
    /// layers, and the per-layer expert loads (host reads: for evaluation and tests).
    public func routingStats() throws -> (aux: [String: Float], load: [String: [Int]]) {
        var aux: [String: Float] = [:]
        for block in blocks {
            for (k, v) in try block.ffn.auxiliaryLosses() { aux[k, default: 0] += v }
        }
        return (aux, try expertLoads())
    }
}
