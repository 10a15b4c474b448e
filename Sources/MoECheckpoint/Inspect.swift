import Foundation

/// What `moe-gpu inspect` reports about a checkpoint.
public struct CheckpointSummary {
    public let path: String
    public let format: String
    public let description: ModelDescription
    public let tensorCount: Int
    /// Tensor count per stored dtype.
    public let dtypes: [String: Int]
    /// Elements of floating-point (and quantised) tensors; integer buffers such as position ids are not parameters.
    public let parameters: Int
    public let routing: RoutingSettings?
    /// Experts per token for checkpoints with routing facts only in config.json (Mixtral from elsewhere).
    public let configTopK: Int?
    /// Written by `moe-gpu train` (the metadata holds the training config).
    public let trained: Bool

    public init(path: String) throws {
        let source = try openCheckpoint(path: path)
        self.path = path
        format = source.sourceDescription
        description = try ArchitectureAdapter.describe(source)
        tensorCount = source.tensors.count
        var d: [String: Int] = [:]
        var p = 0
        for t in source.tensors {
            d[t.dtypeName, default: 0] += 1
            let integer = t.dtypeName.hasPrefix("I") || t.dtypeName.hasPrefix("U") || t.dtypeName == "BOOL"
            if !integer { p += t.count }
        }
        dtypes = d
        parameters = p
        routing = RoutingSettings(metadata: source.metadata)
        configTopK = description.config["num_experts_per_tok"]?.intValue
        trained = RoutingSettings.trainingConfigKeys.contains { source.metadata[$0] != nil }
    }

    var routerName: String {
        routing?.router.rawValue ?? (description.architecture == .mixtral ? RouterKind.topkSoftmax.rawValue : "unknown")
    }
    var topK: Int? { routing?.topK ?? configTopK }
    /// " top-k" where the router routes by top-k (or the router is unknown), else "".
    var topKSuffix: String {
        guard routing.map({ $0.router.usesTopK }) ?? true, let k = topK else { return "" }
        return " top-\(k)"
    }

    /// `routing` line: the router name, then the facts that name uses.
    static func routingLine(_ r: RoutingSettings) -> String {
        var parts = [r.router.rawValue]
        if r.router.usesTopK { parts.append("top-\(r.topK)") }
        parts.append("\(r.experts) experts")
        if r.router.usesCapacityFactor { parts.append(r.capacityFactor > 0 ? "capacity factor \(r.capacityFactor)" : "dropless") }
        if r.router.isExpertChoice { parts.append("combine weights = router probabilities") }
        if r.router.isSphero { parts.append("temperature at init \(r.spheroTau)") }
        return parts.joined(separator: ", ")
    }

    public var text: String {
        let d = description
        var lines = [
            "file          \(path)",
            "format        \(format)",
            "architecture  \(d.architecture.displayName)" + (d.sourceArchitecture.map { $0 != d.architecture ? " (from \($0.displayName))" : "" } ?? ""),
            "layers        \(d.layerCount) (\(d.denseMLPs.count) dense MLP, \(d.moeLayers.count) MoE)",
            "hidden size   \(d.hidden)",
            "FFN size      \(d.ffn)" + (d.gated ? " (gated, \(d.activation.rawValue))" : " (\(d.activation.rawValue))"),
            "dtypes        " + dtypes.keys.sorted().map { "\($0) x\(dtypes[$0]!)" }.joined(separator: ", "),
            "tensors       \(tensorCount)",
            "parameters    \(Self.grouped(parameters)) (\(Self.short(parameters)))",
        ]
        if !d.moeLayers.isEmpty {
            if let r = routing {
                lines.append("routing       " + Self.routingLine(r))
                if r.method != "unknown" {
                    lines.append("upcycled by   \(r.method)" + (r.method == "granular" ? " (granularity \(r.granularity))" : "")
                                 + ", router init \(r.routerInit), seed \(r.seed)" + (r.weightScale != 1 ? String(format: ", weight scale %.4f", r.weightScale) : "")
                                 + ", from a \(r.sourceArchitecture) MLP of width \(r.denseFFN)")
                } else if trained {
                    lines.append("trained by    moe-gpu train")
                }
            } else {
                lines.append("routing       \(routerName)" + (topK.map { ", top-\($0)" } ?? ""))
            }
            for l in 0..<d.layerCount {
                if let m = d.moeLayers[l] {
                    lines.append(String(format: "  layer %3d   MoE: %@, router %@ %@, %@", l, Self.expertsText(m) as NSString,
                                        m.router as NSString, "\(m.routerShape)" as NSString,
                                        "\(routerName)\(topKSuffix)" as NSString))
                } else if d.denseMLPs[l] != nil {
                    lines.append(String(format: "  layer %3d   dense MLP, width %d", l, d.ffn))
                }
            }
        }
        return lines.joined(separator: "\n")
    }

    public var json: JSONValue {
        let d = description
        var m: [(String, JSONValue)] = [
            ("file", .string(path)), ("format", .string(format)),
            ("architecture", .string(d.architecture.rawValue)),
            ("source_architecture", d.sourceArchitecture.map { .string($0.rawValue) } ?? .null),
            ("layers", .int(d.layerCount)), ("hidden_size", .int(d.hidden)), ("ffn_size", .int(d.ffn)),
            ("gated", .bool(d.gated)), ("activation", .string(d.activation.rawValue)),
            ("dtypes", .object(dtypes.keys.sorted().map { ($0, .int(dtypes[$0]!)) })),
            ("tensors", .int(tensorCount)), ("parameters", .int(parameters)),
            ("dense_layers", .array(d.denseMLPs.keys.sorted().map { .int($0) })),
        ]
        m.append(("moe_layers", .array(d.moeLayers.keys.sorted().map { l in
            let x = d.moeLayers[l]!
            return .object([("layer", .int(l)), ("experts", .int(x.experts)), ("expert_width", .int(x.expertWidth)),
                            ("router", .string(x.router)), ("router_shape", .array(x.routerShape.map { .int($0) })),
                            ("routing", .string(routerName)), ("top_k", topK.map { .int($0) } ?? .null),
                            ("slots_per_expert", .int(x.slotsPerExpert)), ("universal_experts", .int(x.universalExperts))])
        })))
        m.append(("routing", routing.map { .object($0.json) } ?? .null))
        return .object(m)
    }

    /// "4 experts x width 16", or for a trained SpheroMoE / Soft MoE with
    /// universal experts and several slots "3 experts (1 x width 16, 2 universal x width 8), 6 slots".
    static func expertsText(_ m: MoELayerDescription) -> String {
        var text = "\(m.experts) experts x width \(m.expertWidth)"
        if m.universalExperts > 0 {
            text = "\(m.experts) experts (\(m.experts - m.universalExperts) x width \(m.expertWidth), \(m.universalExperts) universal x width \(m.universalWidth))"
        }
        if m.slotsPerExpert > 1 { text += ", \(m.experts * m.slotsPerExpert) slots" }
        return text
    }

    static func grouped(_ n: Int) -> String {
        let s = String(n)
        var out = ""
        for (i, c) in s.enumerated() { if i > 0 && (s.count - i) % 3 == 0 { out += "," }; out.append(c) }
        return out
    }
    static func short(_ n: Int) -> String {
        n >= 1_000_000_000 ? String(format: "%.2fB", Double(n) / 1e9) : n >= 1_000_000 ? String(format: "%.1fM", Double(n) / 1e6) : String(format: "%.1fK", Double(n) / 1e3)
    }
}
