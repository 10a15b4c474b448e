import Foundation

/// How an upcycled checkpoint was made and how it routes. Stored as
/// `moe-gpu.*` keys in the safetensors `__metadata__` (and, for Mixtral output,
/// also in config.json) so that `inspect`, `--verify` and the model loader read
/// the same facts.
public struct RoutingSettings: Equatable, Sendable {
    public var router: RouterKind
    public var experts: Int
    public var topK: Int
    public var capacityFactor: Double
    public var method: String
    public var granularity: Int
    public var expertWidth: Int
    public var denseFFN: Int
    /// Factor all expert weight matrices were multiplied by (1 when off).
    public var weightScale: Double
    public var routerInit: String
    public var seed: UInt64
    public var layers: [Int]
    public var sourceArchitecture: String
    public var activation: String
    /// SpheroMoE dispatch/combine temperature at initialisation.
    public var spheroTau: Double

    public var metadata: [String: String] {
        [
            "format": "pt",
            "moe-gpu.format": "moe",
            "moe-gpu.router": router.rawValue,
            "moe-gpu.num_experts": "\(experts)",
            "moe-gpu.top_k": "\(topK)",
            "moe-gpu.capacity_factor": "\(capacityFactor)",
            "moe-gpu.method": method,
            "moe-gpu.granularity": "\(granularity)",
            "moe-gpu.expert_width": "\(expertWidth)",
            "moe-gpu.dense_ffn": "\(denseFFN)",
            "moe-gpu.weight_scale": "\(weightScale)",
            "moe-gpu.router_init": routerInit,
            "moe-gpu.seed": "\(seed)",
            "moe-gpu.moe_layers": layers.map(String.init).joined(separator: ","),
            "moe-gpu.source_architecture": sourceArchitecture,
            "moe-gpu.activation": activation,
            "moe-gpu.sphero_tau": "\(spheroTau)",
        ]
    }

    public var json: [(String, JSONValue)] {
        [("router", .string(router.rawValue)), ("num_experts", .int(experts)), ("top_k", .int(topK)),
         ("capacity_factor", .double(capacityFactor)), ("method", .string(method)), ("granularity", .int(granularity)),
         ("expert_width", .int(expertWidth)), ("dense_ffn", .int(denseFFN)), ("weight_scale", .number("\(weightScale)")),
         ("router_init", .string(routerInit)), ("seed", .number("\(seed)")), ("moe_layers", .array(layers.map { .int($0) })),
         ("source_architecture", .string(sourceArchitecture)), ("activation", .string(activation)),
         ("sphero_tau", .double(spheroTau))]
    }

    /// `__metadata__` keys under which `moe-gpu train` stores the model config
    /// (ViT and language model); their `moe` object is how the model was trained.
    public static let trainingConfigKeys = ["moe-gpu.config", "moe-gpu.lm_config"]

    /// Reads the settings back from `__metadata__`; nil when the file has none.
    /// A checkpoint written by `moe-gpu train` carries its training config, and
    /// the router name and capacity factor come from it (`RouterKind(trainingRouter:
    /// gateOrder:renormalize:)`), so old files whose `moe-gpu.router` said
    /// `softmax-topk` for a renormalised top-k read as `topk-softmax`, language-model
    /// checkpoints written without `moe-gpu.router` are read too, and an expert-choice
    /// run that left its capacity factor to the default reads 2, not 0.
    public init?(metadata m: [String: String]) {
        let trained = Self.trainingRouting(m)
        guard m["moe-gpu.format"] == "moe", let r = trained?.router ?? m["moe-gpu.router"].flatMap(RouterKind.init(rawValue:)),
              let e = m["moe-gpu.num_experts"].flatMap(Int.init), let k = m["moe-gpu.top_k"].flatMap(Int.init) else { return nil }
        router = r; experts = e; topK = k
        capacityFactor = trained?.capacityFactor ?? m["moe-gpu.capacity_factor"].flatMap(Double.init) ?? 2
        method = m["moe-gpu.method"] ?? "unknown"
        granularity = m["moe-gpu.granularity"].flatMap(Int.init) ?? 1
        expertWidth = m["moe-gpu.expert_width"].flatMap(Int.init) ?? 0
        denseFFN = m["moe-gpu.dense_ffn"].flatMap(Int.init) ?? 0
        weightScale = m["moe-gpu.weight_scale"].flatMap(Double.init) ?? 1
        routerInit = m["moe-gpu.router_init"] ?? "unknown"
        seed = m["moe-gpu.seed"].flatMap(UInt64.init) ?? 0
        layers = (m["moe-gpu.moe_layers"] ?? "").split(separator: ",").compactMap { Int($0) }
        sourceArchitecture = m["moe-gpu.source_architecture"] ?? "unknown"
        activation = m["moe-gpu.activation"] ?? "unknown"
        spheroTau = m["moe-gpu.sphero_tau"].flatMap(Double.init) ?? 0.5
    }

    /// The router and capacity factor (0: dropless) of the training config
    /// stored in the metadata, if there is one with an MoE config.
    static func trainingRouting(_ m: [String: String]) -> (router: RouterKind, capacityFactor: Double)? {
        for key in trainingConfigKeys {
            guard let text = m[key], let config = try? JSONParser.parse(Array(text.utf8)), let moe = config["moe"],
                  let name = moe["router"]?.stringValue else { continue }
            // MoEConfig's defaults for keys a config leaves out.
            let order = moe["gateOrder"]?.stringValue ?? "softmax-topk"
            let renormalize = moe["renormalize"].map { $0 == .bool(true) } ?? true
            guard let r = RouterKind(trainingRouter: name, gateOrder: order, renormalize: renormalize) else { return nil }
            let factor = moe["capacityFactor"]?.doubleValue ?? (r.isExpertChoice ? RouterKind.defaultExpertChoiceCapacityFactor : 0)
            return (r, factor)
        }
        return nil
    }

    public init(router: RouterKind, experts: Int, topK: Int, capacityFactor: Double, method: String, granularity: Int,
                expertWidth: Int, denseFFN: Int, weightScale: Double, routerInit: String, seed: UInt64, layers: [Int],
                sourceArchitecture: String, activation: String, spheroTau: Double = 0.5) {
        self.router = router; self.experts = experts; self.topK = topK; self.capacityFactor = capacityFactor
        self.method = method; self.granularity = granularity; self.expertWidth = expertWidth; self.denseFFN = denseFFN
        self.weightScale = weightScale; self.routerInit = routerInit; self.seed = seed; self.layers = layers
        self.sourceArchitecture = sourceArchitecture; self.activation = activation; self.spheroTau = spheroTau
    }
}
