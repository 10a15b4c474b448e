import Foundation

/// The model families the adapters recognise from tensor names.
public enum Architecture: String, CaseIterable, Sendable {
    case bert, vit, vitTimm = "vit-timm", gpt2, llama, mixtral, moeGPU = "moe-gpu"

    public var displayName: String {
        switch self {
        case .bert: return "BERT"
        case .vit: return "ViT (Hugging Face names)"
        case .vitTimm: return "ViT (timm names)"
        case .gpt2: return "GPT-2"
        case .llama: return "Llama"
        case .mixtral: return "Mixtral (MoE)"
        case .moeGPU: return "moe-gpu"
        }
    }
    /// SwiGLU MLPs (gate, up, down) rather than fc1 -> activation -> fc2.
    public var isGated: Bool { self == .llama || self == .mixtral }

    public static let supportedList = "BERT, ViT (Hugging Face and timm names), GPT-2, Llama (safetensors or GGUF), Mixtral, moe-gpu's own naming"
}

/// MLP non-linearities, by the names Hugging Face configs use.
public enum Activation: String, Sendable {
    case gelu, geluTanh = "gelu_new", relu, silu

    public func apply(_ x: Double) -> Double {
        switch self {
        case .gelu: return 0.5 * x * (1 + erf(x / 2.0.squareRoot()))
        case .geluTanh: return 0.5 * x * (1 + tanh((2 / Double.pi).squareRoot() * (x + 0.044715 * x * x * x)))
        case .relu: return max(0, x)
        case .silu: return x / (1 + exp(-x))
        }
    }

    /// Maps a config's `hidden_act` / `activation_function` to one of ours.
    public init?(configName: String) {
        switch configName {
        case "gelu", "gelu_python": self = .gelu
        case "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_tanh": self = .geluTanh
        case "relu": self = .relu
        case "silu", "swish": self = .silu
        default: return nil
        }
    }
}

/// The tensor names of one dense MLP block.
public struct DenseMLPNames: Sendable, Equatable {
    public let layer: Int
    /// Plain MLPs: fc1 (`[I,H]`, or `[H,I]` when `transposed`) and fc2; gated MLPs: gate, up, down.
    public let fc1: String, fc1Bias: String?, fc2: String, fc2Bias: String?
    public let gate: String?
    /// GPT-2's Conv1D stores weights as `[in, out]`.
    public let transposed: Bool

    public var allNames: [String] { [gate, fc1, fc1Bias, fc2, fc2Bias].compactMap { $0 } }
}

/// One MoE layer found in a checkpoint.
public struct MoELayerDescription: Sendable, Equatable {
    public let layer: Int
    public let experts: Int
    public let expertWidth: Int
    public let router: String
    public let routerShape: [Int]
    public let gated: Bool
    /// Per expert: [gate?, fc1/up, fc1 bias?, fc2/down, fc2 bias?].
    public let expertNames: [[String]]
    /// SpheroMoE / Soft MoE written by `moe-gpu train`: the last this many of
    /// `expertNames` are universal experts (`moe.universal_experts.e.*`, narrower),
    /// the others core experts (`moe.core_experts.e.*`).
    public var universalExperts = 0
    /// Hidden width of the universal experts.
    public var universalWidth = 0
    /// SpheroMoE's learnt temperatures (`moe.temperature_dispatch`, `moe.temperature_combine`, `[1]`).
    public var temperatureDispatch: String? = nil
    public var temperatureCombine: String? = nil
    /// Router rows (slots) per expert: 1 except for Soft MoE / SpheroMoE with several slots per expert.
    public var slotsPerExpert: Int { experts > 0 && (routerShape.first ?? 0) % experts == 0 ? max(1, (routerShape.first ?? 0) / experts) : 1 }
}

/// What an adapter found: the architecture, sizes, and which tensors are MLPs.
public struct ModelDescription {
    public let architecture: Architecture
    /// For moe-gpu MoE checkpoints, the architecture the dense model had.
    public let sourceArchitecture: Architecture?
    public let layerCount: Int
    public let hidden: Int
    public let ffn: Int
    public let activation: Activation
    public let denseMLPs: [Int: DenseMLPNames]
    public let moeLayers: [Int: MoELayerDescription]
    /// `config.json` beside the checkpoint, or GGUF metadata rendered as one.
    public let config: [String: JSONValue]
    public var gated: Bool { (sourceArchitecture ?? architecture).isGated }
}

/// Recognises the layout of a checkpoint from its tensor names.
public enum ArchitectureAdapter {
    struct Pattern {
        let regex: Regex<AnyRegexOutput>
        init(_ s: String) { regex = try! Regex(s) }
        /// (prefix, layer) of a whole-name match.
        func match(_ name: String) -> (String, Int)? {
            guard let m = try? regex.wholeMatch(in: name), m.count >= 3,
                  let p = m[1].substring, let l = m[2].substring, let layer = Int(l) else { return nil }
            return (String(p), layer)
        }
    }

    static let bertFC1 = Pattern(#"(.*?)encoder\.layer\.(\d+)\.intermediate\.dense\.weight"#)
    static let blocksFC1 = Pattern(#"(.*?)blocks\.(\d+)\.mlp\.fc1\.weight"#)
    static let blocksGate = Pattern(#"(.*?)blocks\.(\d+)\.mlp\.gate\.weight"#)
    static let gpt2FC = Pattern(#"(.*?)h\.(\d+)\.mlp\.c_fc\.weight"#)
    static let llamaGate = Pattern(#"(.*?)layers\.(\d+)\.mlp\.gate_proj\.weight"#)
    static let mixtralGate = Pattern(#"(.*?)layers\.(\d+)\.block_sparse_moe\.gate\.weight"#)
    static let ownRouter = Pattern(#"(.*?)blocks\.(\d+)\.moe\.router\.weight"#)

    /// Describes `source`, reading `config.json` beside it when there is one.
    public static func describe(_ source: TensorSource) throws -> ModelDescription {
        let names = source.names
        let meta = source.metadata
        let config = try loadConfig(source)
        func need(_ n: String) -> String? { names.contains(n) ? n : nil }
        func shape(_ n: String) -> [Int] { source.descriptor(n)?.shape ?? [] }

        var dense: [Int: DenseMLPNames] = [:]
        var arch: Architecture?
        for n in source.tensors.map(\.name) {
            if let (p, l) = bertFC1.match(n) {
                let q = "\(p)encoder.layer.\(l)."
                guard let fc2 = need(q + "output.dense.weight") else { continue }
                dense[l] = DenseMLPNames(layer: l, fc1: n, fc1Bias: need(q + "intermediate.dense.bias"), fc2: fc2,
                                         fc2Bias: need(q + "output.dense.bias"), gate: nil, transposed: false)
                arch = names.contains { $0.contains("layernorm_before") || $0.contains("patch_embeddings") } ? .vit : .bert
            } else if let (p, l) = blocksFC1.match(n) {
                let q = "\(p)blocks.\(l).mlp."
                guard let fc2 = need(q + "fc2.weight") else { continue }
                dense[l] = DenseMLPNames(layer: l, fc1: n, fc1Bias: need(q + "fc1.bias"), fc2: fc2, fc2Bias: need(q + "fc2.bias"),
                                         gate: nil, transposed: false)
                let timm = names.contains { $0.hasPrefix("patch_embed.") || $0 == "cls_token" }
                arch = meta["moe-gpu.architecture"] != nil || !timm ? .moeGPU : .vitTimm
            } else if let (p, l) = blocksGate.match(n) {
                let q = "\(p)blocks.\(l).mlp."
                guard let up = need(q + "up.weight"), let down = need(q + "down.weight") else { continue }
                dense[l] = DenseMLPNames(layer: l, fc1: up, fc1Bias: nil, fc2: down, fc2Bias: nil, gate: n, transposed: false)
                arch = .moeGPU
            } else if let (p, l) = gpt2FC.match(n) {
                let q = "\(p)h.\(l).mlp."
                guard let fc2 = need(q + "c_proj.weight") else { continue }
                dense[l] = DenseMLPNames(layer: l, fc1: n, fc1Bias: need(q + "c_fc.bias"), fc2: fc2, fc2Bias: need(q + "c_proj.bias"),
                                         gate: nil, transposed: true)
                arch = .gpt2
            } else if let (p, l) = llamaGate.match(n) {
                let q = "\(p)layers.\(l).mlp."
                guard let up = need(q + "up_proj.weight"), let down = need(q + "down_proj.weight") else { continue }
                dense[l] = DenseMLPNames(layer: l, fc1: up, fc1Bias: need(q + "up_proj.bias"), fc2: down,
                                         fc2Bias: need(q + "down_proj.bias"), gate: n, transposed: false)
                arch = .llama
            }
        }

        var moe: [Int: MoELayerDescription] = [:]
        var sourceArch: Architecture? = meta["moe-gpu.source_architecture"].flatMap(Architecture.init(rawValue:))
        for n in source.tensors.map(\.name) {
            if let (p, l) = mixtralGate.match(n) {
                let q = "\(p)layers.\(l).block_sparse_moe.experts."
                var experts: [[String]] = []
                while let w1 = need(q + "\(experts.count).w1.weight"), let w3 = need(q + "\(experts.count).w3.weight"),
                      let w2 = need(q + "\(experts.count).w2.weight") {
                    experts.append([w1, w3, w2])
                }
                guard !experts.isEmpty else { continue }
                moe[l] = MoELayerDescription(layer: l, experts: experts.count, expertWidth: shape(experts[0][0]).first ?? 0,
                                             router: n, routerShape: shape(n), gated: true, expertNames: experts)
                arch = .mixtral
                sourceArch = .llama
            } else if let (p, l) = ownRouter.match(n) {
                // Experts: `moe.experts.e.*` (upcycled, top-k, expert choice), or
                // `moe.core_experts.e.*` then `moe.universal_experts.e.*` (trained Soft MoE / SpheroMoE).
                func bank(_ q: String) -> [[String]] {
                    var experts: [[String]] = []
                    while true {
                        let e = q + "\(experts.count)."
                        if let g = need(e + "gate.weight"), let u = need(e + "up.weight"), let d = need(e + "down.weight") {
                            experts.append([g, u, d])
                        } else if let f1 = need(e + "fc1.weight"), let f2 = need(e + "fc2.weight") {
                            experts.append([f1, need(e + "fc1.bias"), f2, need(e + "fc2.bias")].compactMap { $0 })
                        } else { break }
                    }
                    return experts
                }
                let q = "\(p)blocks.\(l).moe."
                var experts = bank(q + "experts.")
                var universal = 0
                if experts.isEmpty {
                    let u = bank(q + "universal_experts.")
                    experts = bank(q + "core_experts.") + u
                    universal = u.count
                }
                guard !experts.isEmpty else { continue }
                let gated = experts[0].count == 3 && experts[0][0].hasSuffix("gate.weight")
                var d = MoELayerDescription(layer: l, experts: experts.count, expertWidth: shape(experts[0][0]).first ?? 0,
                                            router: n, routerShape: shape(n), gated: gated, expertNames: experts)
                d.universalExperts = universal
                if universal > 0 { d.universalWidth = shape(experts[experts.count - 1][0]).first ?? 0 }
                d.temperatureDispatch = need(q + "temperature_dispatch")
                d.temperatureCombine = need(q + "temperature_combine")
                moe[l] = d
                if arch == nil { arch = .moeGPU }
            }
        }

        guard let architecture = arch, !(dense.isEmpty && moe.isEmpty) else {
            let sample = source.tensors.prefix(8).map(\.name).joined(separator: ", ")
            throw CheckpointError(.unsupported,
                "unrecognised checkpoint layout in \(source.sourceDescription): supported architectures are \(Architecture.supportedList); none of its \(source.tensors.count) tensor names matched an MLP pattern (first names: \(sample))")
        }
        if !moe.isEmpty, architecture != .mixtral, sourceArch == nil { sourceArch = dense.isEmpty ? nil : architecture }
        let effective = architecture == .moeGPU || architecture == .mixtral ? (sourceArch ?? architecture) : architecture

        // Sizes from the first MLP found.
        var hidden = 0, ffn = 0
        if let first = dense.keys.min().flatMap({ dense[$0] }) {
            let s = shape(first.fc1)
            guard s.count == 2 else { throw CheckpointError(.format, "\(first.fc1) has shape \(s); a 2-d weight was expected") }
            (ffn, hidden) = first.transposed ? (s[1], s[0]) : (s[0], s[1])
        } else if let first = moe.keys.min().flatMap({ moe[$0] }) {
            hidden = first.routerShape.last ?? 0
            ffn = Int(meta["moe-gpu.dense_ffn"] ?? "") ?? first.expertWidth
        }
        let layerCount = (Array(dense.keys) + Array(moe.keys)).max().map { $0 + 1 } ?? 0

        let activation: Activation
        if let a = meta["moe-gpu.activation"].flatMap(Activation.init(rawValue:)) { activation = a }
        else if let a = (config["hidden_act"] ?? config["activation_function"])?.stringValue.flatMap(Activation.init(configName:)) { activation = a }
        else {
            switch effective {
            case .llama, .mixtral: activation = .silu
            case .gpt2: activation = .geluTanh
            default: activation = .gelu
            }
        }
        return ModelDescription(architecture: architecture, sourceArchitecture: sourceArch, layerCount: layerCount,
                                hidden: hidden, ffn: ffn, activation: activation, denseMLPs: dense, moeLayers: moe, config: config)
    }

    /// `config.json` beside a safetensors checkpoint; for GGUF, the Llama facts from its metadata.
    public static func loadConfig(_ source: TensorSource) throws -> [String: JSONValue] {
        if let g = source as? GGUFCheckpoint { return LlamaConfig.fromGGUF(g) }
        let url = source.directory.appendingPathComponent("config.json")
        guard let data = try? Data(contentsOf: url) else { return [:] }
        guard case .object(let m)? = try? JSONParser.parse(Array(data)) else {
            throw CheckpointError.format(url.path, "config.json is not a valid JSON object")
        }
        var out: [String: JSONValue] = [:]
        for (k, v) in m { out[k] = v }
        return out
    }
}

/// The dense MLP of one layer as f32 arrays in Hugging Face orientation (`[out, in]`).
public struct MLPWeights {
    public var hidden: Int, width: Int
    public var gated: Bool
    public var activation: Activation
    /// fc1 (plain) or up (gated): `[width, hidden]`.
    public var w1: [Float]
    public var b1: [Float]?
    /// gate (gated only): `[width, hidden]`.
    public var wg: [Float]?
    /// fc2 / down: `[hidden, width]`.
    public var w2: [Float]
    public var b2: [Float]?

    public init(hidden: Int, width: Int, gated: Bool, activation: Activation, w1: [Float], b1: [Float]?, wg: [Float]?, w2: [Float], b2: [Float]?) {
        self.hidden = hidden; self.width = width; self.gated = gated; self.activation = activation
        self.w1 = w1; self.b1 = b1; self.wg = wg; self.w2 = w2; self.b2 = b2
    }

    /// Loads and checks one dense MLP.
    public static func load(_ source: TensorSource, _ m: DenseMLPNames, activation: Activation) throws -> MLPWeights {
        func get(_ n: String, _ rows: Int, _ cols: Int, transposed: Bool = false) throws -> [Float] {
            let s = source.descriptor(n)?.shape ?? []
            let want = transposed ? [cols, rows] : [rows, cols]
            guard s == want else { throw CheckpointError(.format, "\(n) has shape \(s), expected \(want)") }
            let v = try source.floats(n)
            return transposed ? transpose(v, rows: cols, cols: rows) : v
        }
        func vec(_ n: String?, _ len: Int) throws -> [Float]? {
            guard let n else { return nil }
            let s = source.descriptor(n)?.shape ?? []
            guard s == [len] else { throw CheckpointError(.format, "\(n) has shape \(s), expected [\(len)]") }
            return try source.floats(n)
        }
        let s = source.descriptor(m.fc1)?.shape ?? []
        guard s.count == 2 else { throw CheckpointError(.format, "\(m.fc1) has shape \(s); a 2-d weight was expected") }
        let (width, hidden) = m.transposed ? (s[1], s[0]) : (s[0], s[1])
        let w1 = try get(m.fc1, width, hidden, transposed: m.transposed)
        let wg = try m.gate.map { try get($0, width, hidden) }
        let w2 = try get(m.fc2, hidden, width, transposed: m.transposed)
        return MLPWeights(hidden: hidden, width: width, gated: m.gate != nil, activation: activation,
                          w1: w1, b1: try vec(m.fc1Bias, width), wg: wg, w2: w2, b2: try vec(m.fc2Bias, hidden))
    }
}

/// Row-major `[rows, cols]` to `[cols, rows]`.
public func transpose(_ a: [Float], rows: Int, cols: Int) -> [Float] {
    var out = [Float](repeating: 0, count: a.count)
    for r in 0..<rows { for c in 0..<cols { out[c * rows + r] = a[r * cols + c] } }
    return out
}
