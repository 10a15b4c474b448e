import Foundation
import MoECheckpoint
import MoECompute

/// How a dense Llama's MLPs become experts when it is loaded into an MoE model
/// ("online" upcycling, Llama 3 Meets MoE: no MoE copy is written first).
public enum LMUpcycleMethod: String, CaseIterable, Sendable {
    /// Sparse Upcycling: every expert a copy of the dense MLP.
    case replicate
    /// Each copy of the MLP cut into `granularity` shards of its neurons (expert e =
    /// copy e / G, shard e % G), the shards' outputs multiplied by G and the router
    /// rows tied per copy: with top-k = G the model starts as the dense one.
    case granular
    /// MoE Jetpack's checkpoint recycling: each expert samples its neurons without
    /// replacement in proportion to their importance.
    case recycle
}

public struct LMUpcycleOptions: Sendable {
    public var method: LMUpcycleMethod = .replicate
    public var granularity = 1
    public var seed: UInt64 = 0
    /// Standard deviation of the fresh router (Sparse Upcycling's small normal init).
    public var routerStd: Float = 0.02
    /// Per MoE layer, the importance of each dense hidden neuron (recycle); weight norms when absent.
    public var importance: [Int: [Double]] = [:]
    public init(method: LMUpcycleMethod = .replicate, granularity: Int = 1, seed: UInt64 = 0) {
        self.method = method; self.granularity = granularity; self.seed = seed
    }
}

/// Reading language models from GGUF files, Hugging Face folders (Llama,
/// Mistral-style or Mixtral `config.json` + safetensors) and moe-gpu checkpoints.
public enum LlamaCheckpoint {
    /// Opens `path` (a checkpoint file, a Hugging Face folder, or a moe-gpu run
    /// folder: its model.safetensors) and reads its model config.
    public static func open(_ path: String) throws -> (source: TensorSource, config: LMConfig) {
        let path = resolve(path)
        let source = try openCheckpoint(path: path)
        return (source, try config(of: source, path: path))
    }

    /// A run folder (it has metrics.jsonl or optimizer.safetensors) means its model.safetensors (or a multi-rank run's index).
    public static func resolve(_ path: String) -> String {
        let fm = FileManager.default, dir = path as NSString
        let isRun = fm.fileExists(atPath: dir.appendingPathComponent("metrics.jsonl")) || fm.fileExists(atPath: dir.appendingPathComponent("optimizer.safetensors"))
        guard isRun, let model = TrainRun.modelFile(in: URL(fileURLWithPath: path)) else { return path }
        return model.path
    }

    /// The model a checkpoint holds: the config a moe-gpu run stored, else the
    /// Llama or Mixtral facts of its GGUF metadata or `config.json`.
    public static func config(of source: TensorSource, path: String) throws -> LMConfig {
        if let s = source as? SafetensorsCheckpoint, let text = s.metadata[LlamaModel.configKey] {
            do { return try JSONDecoder().decode(LMConfig.self, from: Data(text.utf8)) } catch {
                throw ModelError.badInput("\(path): the stored language-model config does not parse (\(error))")
            }
        }
        let hf = try ArchitectureAdapter.loadConfig(source)
        guard !hf.isEmpty else {
            throw ModelError.badInput("\(path) has no model config: put the model's config.json beside the safetensors, or use a GGUF file")
        }
        let type = hf["model_type"]?.stringValue ?? "(none)"
        guard ["llama", "mistral", "mixtral"].contains(type) else {
            throw ModelError.badInput("\(path) is a \"\(type)\" model; language-model training supports llama, mistral and mixtral checkpoints")
        }
        func int(_ k: String) throws -> Int {
            guard let v = hf[k]?.intValue else { throw ModelError.badInput("\(path): config.json lacks \(k)") }
            return v
        }
        var c = LMConfig()
        c.tokenizer = path
        c.hidden = try int("hidden_size")
        c.intermediate = try int("intermediate_size")
        c.layers = try int("num_hidden_layers")
        c.heads = try int("num_attention_heads")
        c.kvHeads = hf["num_key_value_heads"]?.intValue ?? c.heads
        c.headDim = hf["head_dim"]?.intValue ?? 0
        c.vocabSize = try hf["vocab_size"]?.intValue ?? source.descriptor("model.embed_tokens.weight")?.shape.first
            ?? { throw ModelError.badInput("\(path): no vocab_size and no model.embed_tokens.weight") }()
        let rope = hf["rope_theta"] ?? hf["rope_parameters"]?["rope_theta"]
        c.ropeTheta = Float(rope?.doubleValue ?? 10000)
        if let s = hf["rope_scaling"] ?? hf["rope_parameters"], s["rope_type"]?.stringValue == "llama3" {
            guard let f = s["factor"]?.doubleValue, let lo = s["low_freq_factor"]?.doubleValue, let hi = s["high_freq_factor"]?.doubleValue,
                  let orig = s["original_max_position_embeddings"]?.intValue else {
                throw ModelError.badInput("\(path): llama3 rope scaling lacks factor, low/high_freq_factor or original_max_position_embeddings")
            }
            c.ropeScaling = LMRopeScaling(factor: Float(f), lowFreqFactor: Float(lo), highFreqFactor: Float(hi), originalMaxPositions: orig)
        } else if let s = hf["rope_scaling"], s != .null {
            throw ModelError.badInput("\(path): rope_scaling \(s.serialized()) is not supported (only rope_type llama3)")
        }
        c.rmsNormEps = Float(hf["rms_norm_eps"]?.doubleValue ?? 1e-5)
        c.maxPositions = hf["max_position_embeddings"]?.intValue ?? 2048
        if case .bool(let tied)? = hf["tie_word_embeddings"] { c.tieEmbeddings = tied }
        else { c.tieEmbeddings = source.descriptor("lm_head.weight") == nil }
        c.bosID = hf["bos_token_id"]?.intValue.map(Int32.init)
        c.eosID = hf["eos_token_id"]?.intValue.map(Int32.init)
        c.padID = hf["pad_token_id"]?.intValue.map(Int32.init)
        if type == "mixtral" {
            var moe = MoEConfig()
            moe.router = "topk"; moe.experts = try int("num_local_experts"); moe.topK = try int("num_experts_per_tok")
            moe.gateOrder = "softmax-topk"; moe.renormalize = true; moe.capacityFactor = nil
            moe.auxLossCoefficient = Float(hf["router_aux_loss_coef"]?.doubleValue ?? 0.01)
            moe.zLossCoefficient = 0
            c.moe = moe
            c.moeLayers = Array(0..<c.layers)
        }
        try c.validate()
        return c
    }

    /// Loads every tensor of `model` from `source`. MoE layers the source holds
    /// as dense MLPs are upcycled with `upcycle` (an error without it); an untied
    /// model takes a tied source's embedding as its head. Shapes must match
    /// exactly. Returns one line per upcycled layer.
    @discardableResult
    public static func load(_ source: TensorSource, into model: LlamaModel, upcycle: LMUpcycleOptions? = nil) throws -> [String] {
        let c = model.config
        var log: [String] = []
        var builders: [Int: ExpertBuilder] = [:]
        // Each MoE layer's last expert tensor here (under expert parallelism, of this rank's experts).
        var lastTensor: [Int: String] = [:]
        for t in model.checkpointTensors { if let (layer, leaf) = moeTensor(t.name), leaf != "gate" { lastTensor[layer] = t.name } }
        for t in model.checkpointTensors {
            if let d = source.descriptor(t.name) {
                guard d.shape == t.shape else {
                    throw ModelError.badInput("\(source.sourceDescription): \(t.name) has shape \(d.shape), the model needs \(t.shape)")
                }
                try t.value().write(try source.floats(t.name))
                source.releasePages(t.name)
                continue
            }
            if t.name == "lm_head.weight", let d = source.descriptor("model.embed_tokens.weight"), d.shape == t.shape {
                try t.value().write(try source.floats("model.embed_tokens.weight"))
                continue
            }
            guard let (layer, leaf) = moeTensor(t.name), c.moeLayers.contains(layer) else {
                throw ModelError.badInput("\(source.sourceDescription) lacks \(t.name) (shape \(t.shape)), which this model needs")
            }
            guard let upcycle else {
                throw ModelError.badInput("\(source.sourceDescription) has a dense MLP in layer \(layer) where the model has an MoE block: pass --upcycle replicate, granular or recycle")
            }
            let builder = try builders[layer] ?? ExpertBuilder(source: source, layer: layer, config: c, options: upcycle)
            if builders[layer] == nil {
                builders[layer] = builder
                log.append(builder.summary)
            }
            try t.value().write(try builder.tensor(leaf))
            // The layer's last tensor: drop its dense copy (one layer's MLP in memory at a time).
            if t.name == lastTensor[layer] {
                builders[layer] = nil
                for n in ["gate_proj", "up_proj", "down_proj"] { source.releasePages("model.layers.\(layer).mlp.\(n).weight") }
            }
        }
        return log
    }

    /// `model.layers.L.block_sparse_moe.gate.weight` -> (L, "gate");
    /// `model.layers.L.block_sparse_moe.experts.E.w1.weight` -> (L, "w1.E").
    static func moeTensor(_ name: String) -> (Int, String)? {
        let parts = name.split(separator: ".")
        guard parts.count >= 6, parts[0] == "model", parts[1] == "layers", let l = Int(parts[2]), parts[3] == "block_sparse_moe" else { return nil }
        if parts[4] == "gate" { return (l, "gate") }
        if parts[4] == "experts", parts.count == 8, let e = Int(parts[5]) { return (l, "\(parts[6]).\(e)") }
        return nil
    }
}

/// The experts and router of one MoE layer, built from the dense MLP of the same layer.
final class ExpertBuilder {
    let layer: Int
    let gate: [Float], up: [Float], down: [Float]
    let hidden: Int, denseWidth: Int, width: Int, experts: Int
    let neurons: [[Int]]
    let outScale: Float
    let routerRows: [Float]
    let summary: String

    init(source: TensorSource, layer l: Int, config c: LMConfig, options o: LMUpcycleOptions) throws {
        layer = l
        let prefix = "model.layers.\(l).mlp."
        guard let gd = source.descriptor(prefix + "gate_proj.weight"), source.has(prefix + "up_proj.weight"),
              source.has(prefix + "down_proj.weight") else {
            throw ModelError.badInput("\(source.sourceDescription) has neither an MoE block nor a dense SwiGLU MLP (gate/up/down_proj) in layer \(l)")
        }
        let hidden = c.hidden, denseWidth = gd.shape[0], width = c.expertIntermediate, experts = c.moe?.experts ?? 1
        self.hidden = hidden; self.denseWidth = denseWidth; self.width = width; self.experts = experts
        guard gd.shape == [denseWidth, hidden] else { throw ModelError.badInput("\(prefix)gate_proj.weight has shape \(gd.shape), expected [*, \(hidden)]") }
        let gate = try source.floats(prefix + "gate_proj.weight")
        let up = try source.floats(prefix + "up_proj.weight")
        let down = try source.floats(prefix + "down_proj.weight")
        self.gate = gate; self.up = up; self.down = down
        guard up.count == gate.count, down.count == gate.count else {
            throw ModelError.badInput("the dense MLP of layer \(l) has gate, up and down projections of different sizes")
        }
        let G = max(o.granularity, 1)
        switch o.method {
        case .replicate:
            guard width == denseWidth else {
                throw ModelError.badConfig("replicate needs experts as wide as the dense MLP (\(denseWidth)), the model's are \(width)")
            }
            neurons = Array(repeating: Array(0..<denseWidth), count: experts)
            outScale = 1
        case .granular:
            guard denseWidth % G == 0, width == denseWidth / G, experts % G == 0 else {
                throw ModelError.badConfig("granular G=\(G) needs experts \(experts) divisible by G and expert width \(width) = \(denseWidth) / G")
            }
            neurons = (0..<experts).map { e in Array(((e % G) * width)..<((e % G + 1) * width)) }
            outScale = Float(G)
        case .recycle:
            guard width <= denseWidth else {
                throw ModelError.badConfig("recycled experts (\(width)) cannot be wider than the dense MLP (\(denseWidth))")
            }
            let (g, u, d, w, h) = (gate, up, down, denseWidth, hidden)
            let weights = o.importance[l] ?? (0..<w).map { i in
                var a = 0.0, b = 0.0, cc = 0.0
                for j in 0..<h { a += Double(g[i * h + j] * g[i * h + j]); b += Double(u[i * h + j] * u[i * h + j]) }
                for r in 0..<h { cc += Double(d[r * w + i] * d[r * w + i]) }
                return (a * b * cc).squareRoot()
            }
            neurons = (0..<experts).map { e in
                var r = SplitMix64(seed: o.seed ^ (UInt64(l) &* 0x9E37_79B9_7F4A_7C15) ^ (UInt64(e + 1) &* 0xD6E8_FEB8_6659_FD93))
                return ImportanceSampling.sample(weights: weights, count: width, rng: &r).sorted()
            }
            outScale = 1
        }
        // A fresh router; granular ties the rows of one copy's shards so top-G picks whole copies.
        let groups = o.method == .granular ? experts / G : experts
        var r = SplitMix64(seed: o.seed ^ 0x0123_4567 ^ (UInt64(l) &* 0xBF58_476D_1CE4_E5B9))
        let base = (0..<(groups * hidden)).map { _ in r.nextGaussian() * o.routerStd }
        routerRows = (0..<experts).flatMap { e in base[((e / (experts / groups)) * hidden)..<((e / (experts / groups) + 1) * hidden)] }
        summary = "layer \(l): \(experts) experts of width \(width) from the dense MLP (\(denseWidth)) by \(o.method.rawValue)\(o.method == .granular ? " G=\(G)" : "")"
    }

    /// `gate`, or `w1.E` / `w3.E` / `w2.E` of expert E.
    func tensor(_ leaf: String) throws -> [Float] {
        if leaf == "gate" { return routerRows }
        let parts = leaf.split(separator: ".")
        guard parts.count == 2, let e = Int(parts[1]), e < experts else { throw ModelError.badInput("unknown expert tensor \(leaf)") }
        let n = neurons[e], h = hidden, w = denseWidth
        switch parts[0] {
        case "w1", "w3":
            let src = parts[0] == "w1" ? gate : up
            var out = [Float](repeating: 0, count: n.count * h)
            for (i, j) in n.enumerated() { out.replaceSubrange((i * h)..<((i + 1) * h), with: src[(j * h)..<((j + 1) * h)]) }
            return out
        default:
            var out = [Float](repeating: 0, count: h * n.count)
            for r in 0..<h { for (i, j) in n.enumerated() { out[r * n.count + i] = down[r * w + j] * outScale } }
            return out
        }
    }
}
