import Foundation
import MoECompute

/// A Llama-family decoder (Llama 2/3, SmolLM2) in which any subset of layers can
/// be a Mixtral-style MoE block (all of them for the Mixtral layout). Saved next
/// to every checkpoint as plain JSON; `LlamaCheckpoint` reads it from a GGUF
/// file or a Hugging Face `config.json`.
public struct LMConfig: Codable, Equatable, Sendable {
    public var vocabSize = 259
    public var hidden = 256
    /// The dense MLP's width (`intermediate_size`); experts are `moe.expertWidthRatio` of it.
    public var intermediate = 768
    public var layers = 4
    public var heads = 8
    /// Key/value heads (grouped-query attention); divides `heads`.
    public var kvHeads = 4
    /// 0: `hidden / heads`.
    public var headDim = 0
    public var ropeTheta: Float = 10000
    public var ropeScaling: LMRopeScaling? = nil
    public var rmsNormEps: Float = 1e-5
    /// The LM head reuses the token embedding (SmolLM2, Llama 3.2 1B).
    public var tieEmbeddings = true
    public var maxPositions = 2048
    public var bosID: Int32? = nil
    public var eosID: Int32? = nil
    public var padID: Int32? = nil
    /// The tokenizer: "byte" (256 bytes + BOS, EOS, PAD), or the path of a GGUF
    /// file, a tokenizer.json or a Hugging Face folder holding one.
    public var tokenizer = "byte"
    /// Layers whose MLP is an MoE block (empty: a dense model).
    public var moeLayers: [Int] = []
    public var moe: MoEConfig? = nil

    public init() {}

    public var resolvedHeadDim: Int { headDim > 0 ? headDim : hidden / max(heads, 1) }
    /// The experts' hidden width.
    public var expertIntermediate: Int {
        max(1, Int((Double(intermediate) * (moe?.expertWidthRatio ?? 1)).rounded()))
    }
    public var rotary: RotaryConfig {
        RotaryConfig(headDim: resolvedHeadDim, theta: ropeTheta, scaling: ropeScaling.map {
            RotaryScaling(factor: $0.factor, lowFreqFactor: $0.lowFreqFactor, highFreqFactor: $0.highFreqFactor,
                          originalMaxPositions: $0.originalMaxPositions)
        })
    }

    public func validate() throws {
        try check(vocabSize > 0 && hidden > 0 && intermediate > 0 && layers > 0, "vocabSize, hidden, intermediate and layers must be positive")
        try check(heads > 0 && kvHeads > 0 && heads % kvHeads == 0, "heads \(heads) must be a multiple of kvHeads \(kvHeads)")
        try check(headDim > 0 || hidden % heads == 0, "hidden \(hidden) must be a multiple of heads \(heads) (or set headDim)")
        try check(resolvedHeadDim % 2 == 0, "the head size \(resolvedHeadDim) must be even for rotary embeddings")
        try check(ropeTheta > 0 && rmsNormEps > 0 && maxPositions > 0, "ropeTheta, rmsNormEps and maxPositions must be positive")
        try check(moeLayers.allSatisfy { (0..<layers).contains($0) }, "moeLayers \(moeLayers) must be in 0..<\(layers)")
        if !moeLayers.isEmpty {
            guard let moe else { throw ModelError.badConfig("moeLayers is set but moe is missing") }
            try moe.validate()
            try check(["topk", "expert-choice"].contains(moe.router),
                      "router \"\(moe.router)\" mixes tokens across positions, which a causal language model must not: use topk or expert-choice")
        }
    }
}

/// Llama-3 `rope_scaling` (`rope_type: llama3`).
public struct LMRopeScaling: Codable, Equatable, Sendable {
    public var factor: Float
    public var lowFreqFactor: Float
    public var highFreqFactor: Float
    public var originalMaxPositions: Int
    public init(factor: Float, lowFreqFactor: Float, highFreqFactor: Float, originalMaxPositions: Int) {
        self.factor = factor; self.lowFreqFactor = lowFreqFactor; self.highFreqFactor = highFreqFactor
        self.originalMaxPositions = originalMaxPositions
    }
}

/// RMSNorm with a learnable gain (no bias).
final class RMSNormLayer {
    let gamma: Parameter
    let eps: Float
    init(_ store: ParameterStore, _ name: String, features: Int, eps: Float) throws {
        gamma = try store.make(name, [features], .ones, decays: false)
        self.eps = eps
    }
    func forward(_ x: Tensor, into y: Tensor, rstd: Tensor) throws {
        try x.backend.rmsNorm(x, gamma: gamma.value, eps: eps, out: y, rstd: rstd)
    }
    /// Adds dX and dGamma (a frozen gain's gradient goes to scratch and is dropped).
    func backward(dY: Tensor, x: Tensor, rstd: Tensor, dX: Tensor) throws {
        let b = dY.backend
        if gamma.grad == nil && frozenScratch == nil { frozenScratch = try b.zeros(gamma.shape) }
        try b.rmsNormBackward(dY: dY, x: x, gamma: gamma.value, rstd: rstd, dX: dX,
                              dGamma: gamma.grad ?? frozenScratch!, accumulate: true)
    }
    private var frozenScratch: Tensor?
}

/// Causal grouped-query self-attention with rotary positions: one GEMM makes
/// `[Q heads | K heads | V heads]` per row (`qkv_proj`, saved as Llama's q/k/v_proj),
/// RoPE rotates the Q and K columns in place, the fused attention op reads Q, K
/// and V straight from that projection (kv head `h / group` for query head `h`)
/// and keeps only the log-sum-exp per query for the backward.
final class CausalSelfAttention {
    let qkv: Linear, output: Linear
    let heads: Int, kvHeads: Int, headDim: Int
    let rotary: RotaryConfig
    let ws: Workspace

    let scratch: Workspace

    init(_ store: ParameterStore, _ name: String, config c: LMConfig, scratch: Workspace) throws {
        self.scratch = scratch
        heads = c.heads; kvHeads = c.kvHeads; headDim = c.resolvedHeadDim; rotary = c.rotary
        qkv = try Linear(store, "\(name).qkv_proj", in: c.hidden, out: (heads + 2 * kvHeads) * headDim, bias: false)
        output = try Linear(store, "\(name).o_proj", in: heads * headDim, out: c.hidden, bias: false)
        ws = Workspace(backend: store.backend)
    }

    var packedWidth: Int { (heads + 2 * kvHeads) * headDim }

    func shape(batch: Int, tokens: Int) -> AttentionConfig {
        .packedQKV(batch: batch, queryHeads: heads, kvHeads: kvHeads, tokens: tokens, headDim: headDim, causal: true)
    }

    /// Rotates (or, with `inverse`, un-rotates: the gradient) the Q and K columns of packed rows.
    func rotate(_ packed: Tensor, positions: Tensor, inverse: Bool) throws {
        let b = packed.backend
        try b.rotary(packed, heads: heads, ld: packedWidth, column: 0, positions: positions, config: rotary, inverse: inverse)
        try b.rotary(packed, heads: kvHeads, ld: packedWidth, column: heads * headDim, positions: positions, config: rotary, inverse: inverse)
    }

    /// x: [B*T, D] -> out: [B*T, D] (overwritten); `positions`: i32 [B*T].
    func forward(_ x: Tensor, batch: Int, tokens: Int, positions: Tensor, into out: Tensor) throws {
        let b = x.backend, rows = batch * tokens, c = shape(batch: batch, tokens: tokens)
        let packed = try ws.get("qkv", [rows, packedWidth])
        try qkv.forward(x, rows: rows, into: packed)
        try rotate(packed, positions: positions, inverse: false)
        let (q, k, v) = try c.views(ofPacked: packed)
        let merged = try ws.get("merged", [rows, heads * headDim]), lse = try ws.get("logSumExp", [batch, heads, tokens])
        try b.attention(c, q: q, k: k, v: v, out: merged, logSumExp: lse)
        try output.forward(merged, rows: rows, into: out)
    }

    /// Writes (overwrites) the input gradient into `dX`.
    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, positions: Tensor, dX: Tensor) throws {
        let b = dOut.backend, rows = batch * tokens, c = shape(batch: batch, tokens: tokens)
        let merged = try ws.get("merged", [rows, heads * headDim]), dMerged = try scratch.get("attn.dMerged", [rows, heads * headDim])
        try output.backward(dY: dOut, x: merged, rows: rows, dX: dMerged)
        let packed = try ws.get("qkv", [rows, packedWidth]), dPacked = try scratch.get("attn.dqkv", [rows, packedWidth])
        let (q, k, v) = try c.views(ofPacked: packed)
        let (dq, dk, dv) = try c.views(ofPacked: dPacked)
        try b.attentionBackward(c, q: q, k: k, v: v, out: merged, logSumExp: try ws.get("logSumExp", [batch, heads, tokens]),
                                dOut: dMerged, dQ: dq, dK: dk, dV: dv)
        // The rotation is orthogonal: its gradient is the inverse rotation.
        try rotate(dPacked, positions: positions, inverse: true)
        try qkv.backward(dY: dPacked, x: x, rows: rows, dX: dX, accumulateDX: false)
    }
}

/// Llama's MLP: `down(silu(gate x) * up x)`, with gate and up as one GEMM
/// (`gate_up_proj`, saved as gate_proj and up_proj).
final class GatedMLP: FeedForward {
    let gateUp: Linear, down: Linear
    let hidden: Int
    let ws: Workspace, scratch: Workspace

    init(_ store: ParameterStore, _ name: String, width: Int, hidden: Int, scratch: Workspace) throws {
        self.hidden = hidden; self.scratch = scratch
        gateUp = try Linear(store, "\(name).gate_up_proj", in: width, out: 2 * hidden, bias: false)
        down = try Linear(store, "\(name).down_proj", in: hidden, out: width, bias: false)
        ws = Workspace(backend: store.backend)
    }

    /// Keeps `h` (gate and up) for the backward; `a = silu(gate) * up` lives in the
    /// shared scratch and is recomputed there (one cheap pass, a `[rows, I]` buffer less per layer).
    func forward(_ x: Tensor, batch: Int, tokens: Int, into out: Tensor, training: Bool, step: Int) throws {
        let rows = batch * tokens, b = x.backend
        let h = try ws.get("h", [rows, 2 * hidden]), a = try scratch.get("mlp.a", [rows, hidden])
        try gateUp.forward(x, rows: rows, into: h)
        try b.swiGLU(h, out: a)
        try down.forward(a, rows: rows, into: out)
    }

    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, dX: Tensor, lossScale: Float) throws {
        let rows = batch * tokens, b = dOut.backend
        let h = try ws.get("h", [rows, 2 * hidden]), a = try scratch.get("mlp.a", [rows, hidden])
        let dA = try scratch.get("mlp.dA", [rows, hidden]), dH = try scratch.get("mlp.dH", [rows, 2 * hidden])
        try b.swiGLU(h, out: a)
        try down.backward(dY: dOut, x: a, rows: rows, dX: dA)
        try b.swiGLUBackward(dY: dA, x: h, dX: dH, accumulate: false)
        try gateUp.backward(dY: dH, x: x, rows: rows, dX: dX, accumulateDX: false)
    }

    func auxiliaryLosses() throws -> [String: Float] { [:] }
}

/// One decoder layer: `mid = x + attn(RMSNorm1(x))`, `out = mid + mlp(RMSNorm2(mid))`.
final class DecoderLayer {
    let index: Int
    let inputNorm: RMSNormLayer, postAttentionNorm: RMSNormLayer
    let attention: CausalSelfAttention
    let ffn: FeedForward
    let ws: Workspace, scratch: Workspace
    private var input: Tensor?

    init(_ store: ParameterStore, index: Int, config c: LMConfig, scratch: Workspace) throws {
        self.index = index; self.scratch = scratch
        let name = "model.layers.\(index)"
        inputNorm = try RMSNormLayer(store, "\(name).input_layernorm.weight", features: c.hidden, eps: c.rmsNormEps)
        attention = try CausalSelfAttention(store, "\(name).self_attn", config: c, scratch: scratch)
        postAttentionNorm = try RMSNormLayer(store, "\(name).post_attention_layernorm.weight", features: c.hidden, eps: c.rmsNormEps)
        if c.moeLayers.contains(index), let m = c.moe {
            ffn = try makeLanguageMoE(store, "\(name).block_sparse_moe", width: c.hidden, hidden: c.expertIntermediate, config: m, scratch: scratch)
        } else {
            ffn = try GatedMLP(store, "\(name).mlp", width: c.hidden, hidden: c.intermediate, scratch: scratch)
        }
        ws = Workspace(backend: store.backend)
    }

    func forward(_ x: Tensor, batch: Int, tokens: Int, positions: Tensor, training: Bool, step: Int) throws -> Tensor {
        let b = x.backend, rows = batch * tokens, d = x.shape.last!
        input = x
        let n1 = try ws.get("n1", [rows, d])
        try inputNorm.forward(x, into: n1, rstd: try ws.get("r1", [rows]))
        let attnOut = try scratch.get("layer.attnOut", [rows, d])
        try attention.forward(n1, batch: batch, tokens: tokens, positions: positions, into: attnOut)
        let mid = try ws.get("mid", [rows, d])
        try b.add(x, attnOut, into: mid)
        let n2 = try ws.get("n2", [rows, d])
        try postAttentionNorm.forward(mid, into: n2, rstd: try ws.get("r2", [rows]))
        let ffnOut = try scratch.get("layer.ffnOut", [rows, d])
        try ffn.forward(n2, batch: batch, tokens: tokens, into: ffnOut, training: training, step: step)
        let out = try ws.get("out", [rows, d])
        try b.add(mid, ffnOut, into: out)
        return out
    }

    /// dX: the gradient of the layer output, replaced in place by the input's.
    func backward(_ dX: Tensor, batch: Int, tokens: Int, positions: Tensor, lossScale: Float) throws {
        guard let input else { throw ShapeError("decoder layer backward called before forward") }
        let rows = batch * tokens, d = dX.shape.last!
        let dN2 = try scratch.get("layer.dN2", [rows, d])
        try ffn.backward(dOut: dX, x: try ws.get("n2", [rows, d]), batch: batch, tokens: tokens, dX: dN2, lossScale: lossScale)
        try postAttentionNorm.backward(dY: dN2, x: try ws.get("mid", [rows, d]), rstd: try ws.get("r2", [rows]), dX: dX)
        let dN1 = try scratch.get("layer.dN1", [rows, d])
        try attention.backward(dOut: dX, x: try ws.get("n1", [rows, d]), batch: batch, tokens: tokens, positions: positions, dX: dN1)
        try inputNorm.backward(dY: dN1, x: input, rstd: try ws.get("r1", [rows]), dX: dX)
    }
}

/// A Mixtral-style MoE block: a bias-free router (`gate`), top-k of the softmax
/// (renormalised as Mixtral, or not as Qwen2-MoE's `norm_topk_prob: false`) or
/// expert choice, SwiGLU experts as grouped GEMMs.
func makeLanguageMoE(_ store: ParameterStore, _ name: String, width: Int, hidden: Int, config c: MoEConfig, scratch: Workspace) throws -> MoELayer {
    let routing: MoELayer.Routing
    switch c.router {
    case "expert-choice":
        routing = .expertChoice(capacityFactor: c.capacityFactor ?? 2)
    default:
        let gate = GateConfig(k: c.topK, mode: c.gateOrder == "topk-softmax" ? .topKThenSoftmax : .softmaxThenTopK,
                              renormalize: c.renormalize, jitter: c.jitter > 0 ? GateJitter(epsilon: c.jitter, seed: 0) : nil)
        routing = .topK(gate: gate, dispatch: DispatchConfig(experts: c.experts, capacity: c.capacityFactor.map { .factor($0) } ?? .dropless,
                                                             dropPolicy: c.dropPolicy == "probs" ? .probs : .position))
    }
    return try MoELayer(store, name, width: width, hidden: hidden, experts: c.experts, routing: routing,
                        auxCoefficient: c.router == "expert-choice" ? 0 : c.auxLossCoefficient, zCoefficient: c.zLossCoefficient,
                        experts: .swiGLU, dropout: c.dropout, routerName: "gate", expertsName: "experts", scratch: scratch)
}

/// Llama / Mixtral decoder: token embedding, decoder layers, final RMSNorm, LM
/// head (or the tied embedding), next-token logits `[B*T, vocab]`. Inputs are
/// token ids `[B, T]` (i32); the batch source writes the targets, -100 where a
/// position has none.
public final class LlamaModel: Model {
    public let config: LMConfig
    public let params: ParameterStore
    public var backend: Backend { params.backend }
    let embedding: Parameter
    let layers: [DecoderLayer]
    let finalNorm: RMSNormLayer
    let lmHead: Parameter?
    let ws: Workspace
    /// Tokens per training example, for tokens/s.
    public var sequenceLength: Int

    /// `training: false` builds an inference-only model (no gradients, no moments);
    /// `trainable` picks the parameters that train (nil: all); `initialize: false`
    /// leaves every value zero for a checkpoint to fill (`LlamaCheckpoint.load`).
    public init(config: LMConfig, backend: Backend, seed: UInt64, sequenceLength: Int = 256, training: Bool = true,
                trainable: ((String) -> Bool)? = nil, initialize: Bool = true) throws {
        try config.validate()
        self.config = config
        self.sequenceLength = sequenceLength
        let store = ParameterStore(backend: backend, seed: seed, training: training, trainable: trainable,
                                   initialize: initialize, deferGradients: true)
        params = store
        embedding = try store.make("model.embed_tokens.weight", [config.vocabSize, config.hidden], .normal(std: 0.02), decays: false)
        let scratch = Workspace(backend: backend)
        layers = try (0..<config.layers).map { try DecoderLayer(store, index: $0, config: config, scratch: scratch) }
        finalNorm = try RMSNormLayer(store, "model.norm.weight", features: config.hidden, eps: config.rmsNormEps)
        lmHead = config.tieEmbeddings ? nil : try store.make("lm_head.weight", [config.vocabSize, config.hidden], .normal(std: 0.02), decays: true)
        ws = Workspace(backend: backend)
        try store.finalize()
    }

    public var tokensPerExample: Int { sequenceLength }

    /// Parameters one token uses: all, except each expert bank counts by k / E
    /// (top-k) or the capacity factor / E (expert choice). 6 x this x tokens is a
    /// training step's model FLOPs.
    public var activeParameterCount: Double {
        var active = Double(params.parameterCount)
        guard let m = config.moe else { return active }
        for layer in layers {
            guard let moe = layer.ffn as? MoELayer else { continue }
            let share = m.router == "expert-choice" ? min(1, (m.capacityFactor ?? 2) / Double(m.experts)) : Double(m.topK) / Double(m.experts)
            active -= Double(moe.experts.w1.count + moe.experts.w2.count) * (1 - share)
        }
        return active
    }
    var headWeight: Parameter { lmHead ?? embedding }

    private var last: (batch: Int, tokens: Int, positions: Tensor, top: Tensor)?
    private var positionTables: [[Int]: Tensor] = [:]

    /// Positions `0..<T` for each of `B` sequences, uploaded once per shape.
    func positions(batch: Int, tokens: Int, start: Int = 0) throws -> Tensor {
        let key = [batch, tokens, start]
        if let p = positionTables[key] { return p }
        var values = [Int32](repeating: 0, count: batch * tokens)
        for i in 0..<values.count { values[i] = Int32(start + i % max(tokens, 1)) }
        let p = try backend.tensor(ints: values, shape: [batch * tokens])
        positionTables[key] = p
        return p
    }

    public func forward(_ inputs: Tensor, training: Bool, step: Int) throws -> Tensor {
        let b = backend, c = config
        guard inputs.rank == 2, inputs.dtype == .i32 else {
            throw ModelError.badInput("a language model takes token ids [batch, tokens] (i32), got \(inputs.dtype) \(inputs.shape)")
        }
        let batch = inputs.shape[0], tokens = inputs.shape[1], rows = batch * tokens
        guard tokens <= c.maxPositions else {
            throw ModelError.badInput("sequences of \(tokens) tokens exceed the model's context of \(c.maxPositions): lower --seq-len")
        }
        let pos = try positions(batch: batch, tokens: tokens)
        let x = try ws.get("x", [rows, c.hidden])
        try b.embedding(table: embedding.value, ids: inputs, out: x)
        var h = x
        for layer in layers { h = try layer.forward(h, batch: batch, tokens: tokens, positions: pos, training: training, step: step) }
        last = (batch, tokens, pos, h)
        let normed = try ws.get("normed", [rows, c.hidden])
        try finalNorm.forward(h, into: normed, rstd: try ws.get("nr", [rows]))
        let logits = try ws.get("logits", [rows, c.vocabSize])
        try b.gemm(Gemm(m: rows, n: c.vocabSize, k: c.hidden, transB: true), normed, headWeight.value, logits)
        return logits
    }

    public func backward(dLogits: Tensor, inputs: Tensor, lossScale: Float) throws {
        guard let last else { throw ModelError.badInput("backward called before forward") }
        let b = backend, c = config, rows = last.batch * last.tokens
        let normed = try ws.get("normed", [rows, c.hidden]), dNormed = try ws.get("dNormed", [rows, c.hidden])
        if let dW = headWeight.grad {
            try b.gemm(Gemm(m: c.vocabSize, n: c.hidden, k: rows, transA: true, beta: 1), dLogits, normed, dW)
        }
        try b.gemm(Gemm(m: rows, n: c.hidden, k: c.vocabSize), dLogits, headWeight.value, dNormed)
        let dX = try ws.get("dX", [rows, c.hidden])
        try b.fill(dX, value: 0)
        try finalNorm.backward(dY: dNormed, x: last.top, rstd: try ws.get("nr", [rows]), dX: dX)
        for layer in layers.reversed() {
            try layer.backward(dX, batch: last.batch, tokens: last.tokens, positions: last.positions, lossScale: lossScale)
        }
        if let dE = embedding.grad { try b.embeddingBackward(dOut: dX, ids: inputs, dTable: dE) }
    }

    public var routedLayers: [(name: String, layer: RoutedLayer)] {
        layers.compactMap { l in (l.ffn as? RoutedLayer).map { ("model.layers.\(l.index)", $0) } }
    }

    public var checkpointMetadata: [String: String] {
        get throws {
            var m: [String: String] = ["moe-gpu.task": "lm", "moe-gpu.architecture": config.moeLayers.isEmpty ? "llama" : "mixtral"]
            m[LlamaModel.configKey] = String(decoding: try JSONEncoder.sorted.encode(config), as: UTF8.self)
            m["moe-gpu.format"] = config.moeLayers.isEmpty ? "dense" : "moe"
            if let moe = config.moe, !config.moeLayers.isEmpty {
                m["moe-gpu.router"] = moe.routerName
                m["moe-gpu.num_experts"] = "\(moe.experts)"
                m["moe-gpu.top_k"] = "\(moe.topK)"
                m["moe-gpu.capacity_factor"] = "\(moe.capacityFactor ?? 0)"
                m["moe-gpu.activation"] = "silu"
                m["moe-gpu.moe_layers"] = config.moeLayers.map(String.init).joined(separator: ",")
            }
            return m
        }
    }

    static let configKey = "moe-gpu.lm_config"

    /// Hugging Face names: q/k/v_proj and gate/up_proj are slices of the fused
    /// projections; Mixtral experts are `experts.e.w1` (gate), `w3` (up), `w2` (down).
    public var checkpointTensors: [CheckpointTensor] {
        let hd = config.resolvedHeadDim, d = config.hidden
        return params.all.flatMap { p -> [CheckpointTensor] in
            func slice(_ name: String, _ shape: [Int], _ offset: Int) -> CheckpointTensor {
                CheckpointTensor(name: name, shape: shape, parameter: p, offset: offset)
            }
            if p.name.hasSuffix(".qkv_proj.weight") {
                let base = String(p.name.dropLast("qkv_proj.weight".count))
                let q = config.heads * hd, kv = config.kvHeads * hd
                return [slice(base + "q_proj.weight", [q, d], 0), slice(base + "k_proj.weight", [kv, d], q * d),
                        slice(base + "v_proj.weight", [kv, d], (q + kv) * d)]
            }
            if p.name.hasSuffix(".gate_up_proj.weight") {
                let base = String(p.name.dropLast("gate_up_proj.weight".count)), i = p.shape[0] / 2
                return [slice(base + "gate_proj.weight", [i, d], 0), slice(base + "up_proj.weight", [i, d], i * d)]
            }
            // Experts by global index: under expert parallelism a rank holds experts first..<first+e.
            let first = p.expertRows?.lowerBound ?? 0
            if p.name.hasSuffix(".experts.w13") {
                let base = String(p.name.dropLast("w13".count)), e = p.shape[0], i = p.shape[1] / 2
                return (0..<e).flatMap { x in [slice("\(base)\(first + x).w1.weight", [i, d], x * 2 * i * d),
                                               slice("\(base)\(first + x).w3.weight", [i, d], x * 2 * i * d + i * d)] }
            }
            if p.name.hasSuffix(".experts.w2") {
                let base = String(p.name.dropLast("w2".count)), e = p.shape[0], i = p.shape[2]
                return (0..<e).map { x in slice("\(base)\(first + x).w2.weight", [d, i], x * d * i) }
            }
            return [slice(p.name, p.shape, 0)]
        }
    }
}
