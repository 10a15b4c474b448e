import Foundation
import MoECompute

/// How experts are made from the dense MLP.
public enum UpcycleMethod: String, CaseIterable, Sendable {
    /// Sparse Upcycling: every expert is the dense MLP.
    case replicate
    /// Virtual-group upcycling: experts are G shards of the FFN, replicated E/G times.
    case granular
    /// MoE Jetpack checkpoint recycling: experts sample neurons by importance.
    case recycle
}

public enum RouterInit: String, CaseIterable, Sendable { case random, zero, hidden }

/// `mixtral` (Hugging Face Mixtral layout + config.json, Llama input only) or `own` (moe-gpu naming).
public enum OutputFormat: String, CaseIterable, Sendable { case auto, mixtral, own }

/// Which dense layers become MoE layers.
public enum LayerSelection: Equatable, Sendable {
    case all
    /// Every other block starting from the second (1, 3, 5, ...), as in Sparse Upcycling / V-MoE.
    case everyOther
    case list([Int])

    /// `all`, `every-other`, or a comma list of layers and ranges (`0,2,5-7`).
    public init(parsing s: String) throws {
        switch s {
        case "all": self = .all
        case "every-other": self = .everyOther
        default:
            var out: [Int] = []
            for part in s.split(separator: ",", omittingEmptySubsequences: false) {
                let ends = part.split(separator: "-", omittingEmptySubsequences: false).map { Int($0.trimmingCharacters(in: .whitespaces)) }
                if ends.count == 1, let a = ends[0] { out.append(a) }
                else if ends.count == 2, let a = ends[0], let b = ends[1], a <= b { out.append(contentsOf: a...b) }
                else { throw CheckpointError(.usage, "--layers \(s) is not all, every-other or a list like 0,2,5-7") }
            }
            self = .list(out)
        }
    }

    func resolve(available: [Int]) throws -> [Int] {
        switch self {
        case .all: return available
        case .everyOther: return available.enumerated().filter { $0.offset % 2 == 1 }.map(\.element)
        case .list(let l):
            for x in l where !available.contains(x) {
                throw CheckpointError(.usage, "--layers names layer \(x), but the model's MLP layers are \(available.first ?? 0)...\(available.last ?? 0)")
            }
            return Array(Set(l)).sorted()
        }
    }
}

public struct UpcycleOptions: Sendable {
    public var experts = 8
    public var topK = 2
    public var layers = LayerSelection.all
    public var method = UpcycleMethod.replicate
    public var granularity = 1
    public var weightScaling = false
    public var expertWidth: Int?
    /// MoE Jetpack: recycle into a model of this residual width (a moe-gpu ViT wider than it).
    public var width: Int?
    public var calibrationPath: String?
    public var seed: UInt64 = 0
    public var routerInit = RouterInit.random
    public var router = RouterKind.topkSoftmax
    public var capacityFactor = 2.0
    public var format = OutputFormat.auto
    /// Standard deviation of the random router (Sparse Upcycling's small normal init).
    public var routerStd: Float = 0.02
    public var verify = false
    /// Random tokens per layer for `--verify` (calibration rows are added to them).
    public var verifyTokens = 16
    public init() {}
}

/// The numbers `--verify` prints for one MoE layer.
public struct LayerCheck: Sendable {
    public let layer: Int
    /// Largest per-token `||moe - dense|| / ||dense||`.
    public let maxRelativeDifference: Double
    public let tokens: Int
    /// Tokens no expert took (expert choice only); excluded from the difference.
    public let dropped: Int
    /// `||moe|| / ||dense||` summed over tokens: how the output scale moved.
    public let normRatio: Double
}

public struct VerifyReport: Sendable {
    public let layers: [LayerCheck]
    /// Whether the recipe promises the dense function (replicate / granular with renormalised routing).
    public let expectExact: Bool
    public let reason: String
    public static let tolerance = 1e-5
    public var maxRelativeDifference: Double { layers.map(\.maxRelativeDifference).max() ?? 0 }
    public var passed: Bool { !expectExact || maxRelativeDifference <= Self.tolerance }
}

public struct UpcycleResult: Sendable {
    public let checkpoint: URL
    public let config: URL?
    public let layers: [Int]
    public let settings: RoutingSettings
    public let tensorCount: Int
    public let verification: VerifyReport?
}

/// Which neurons of the dense MLP one expert takes, and how its weights are scaled.
struct ExpertSpec {
    var neurons: [Int]
    /// Multiplies fc1/up/gate (and b1).
    var inScale: Float
    /// Multiplies fc2/down.
    var outScale: Float
    /// Multiplies b2.
    var biasScale: Float

    func build(from d: MLPWeights) -> MLPWeights {
        let H = d.hidden, W = neurons.count
        var w1 = [Float](repeating: 0, count: W * H), w2 = [Float](repeating: 0, count: H * W)
        var wg: [Float]? = d.wg == nil ? nil : [Float](repeating: 0, count: W * H)
        for (r, n) in neurons.enumerated() {
            for j in 0..<H { w1[r * H + j] = d.w1[n * H + j] * inScale }
            if let g = d.wg { for j in 0..<H { wg![r * H + j] = g[n * H + j] * inScale } }
            for o in 0..<H { w2[o * W + r] = d.w2[o * d.width + n] * outScale }
        }
        return MLPWeights(hidden: H, width: W, gated: d.gated, activation: d.activation, w1: w1,
                          b1: d.b1.map { b in neurons.map { b[$0] * inScale } }, wg: wg, w2: w2,
                          b2: d.b2.map { $0.map { $0 * biasScale } })
    }
}

/// Seeded streams: one generator per (purpose, layer, expert), so results do not
/// depend on the order layers are processed in.
func rng(_ seed: UInt64, _ stream: UInt64...) -> SplitMix64 {
    var s = seed
    for x in stream { var g = SplitMix64(seed: s ^ (x &* 0xD6E8_FEB8_6659_FD93)); s = g.next() }
    return SplitMix64(seed: s)
}

/// Weighted sampling without replacement (Efraimidis–Spirakis): each index gets
/// key `log(u)/w` and the `count` largest keys win. This draws the same
/// distribution as picking one index at a time with probability proportional to
/// its weight among those left. Zero weights come last, in index order.
public enum ImportanceSampling {
    public static func sample(weights: [Double], count: Int, rng: inout SplitMix64) -> [Int] {
        let keys: [Double] = weights.map { w in
            let u = max(Double(rng.next() >> 11) / Double(1 << 53), 1e-300)
            return w > 0 ? log(u) / w : -.infinity
        }
        let order = keys.indices.sorted { keys[$0] != keys[$1] ? keys[$0] > keys[$1] : $0 < $1 }
        return Array(order.prefix(count))
    }
}

/// Turns a dense checkpoint into an MoE checkpoint, one tensor at a time.
public struct Upcycler {
    public let options: UpcycleOptions
    public init(options: UpcycleOptions) { self.options = options }

    /// Upcycles `from` into `to` (a `.safetensors` file, or a folder that will hold
    /// `model.safetensors` and, for Mixtral, `config.json`). Nothing is written
    /// unless every check passes; a failed write leaves no file behind.
    public func run(from: String, to: String, log: (String) -> Void = { _ in }) throws -> UpcycleResult {
        let o = options
        let original = try openCheckpoint(path: from)
        var source: TensorSource = original
        var wideCalibration: CalibrationData?
        var precomputedImportance: [Int: [Double]] = [:]
        var reduction: ViTWidthReduction?
        if let width = o.width {
            // MoE Jetpack from a larger predecessor: narrow the source, then upcycle as usual.
            let wide = try ArchitectureAdapter.describe(original)
            guard [.moeGPU, .vitTimm].contains(wide.architecture), wide.moeLayers.isEmpty,
                  let config = original.metadata["moe-gpu.config"], let json = try? JSONParser.parse(Array(config.utf8)),
                  let heads = json["heads"]?.intValue else {
                throw CheckpointError(.unsupported, "--width recycles dense ViTs written by moe-gpu train only (this is \(wide.architecture.displayName)); other architectures are not supported yet")
            }
            guard o.method == .recycle else { throw CheckpointError(.usage, "--width needs --method recycle (a narrower model cannot copy the dense MLP whole)") }
            let layers = try o.layers.resolve(available: wide.denseMLPs.keys.sorted())
            wideCalibration = try o.calibrationPath.map { try CalibrationData.load(path: $0, hidden: wide.hidden) }
            var channelImportance: [Double]?
            if let cal = wideCalibration {
                // Channels by the L2 norm of the LayerNorm outputs (the states feeding the MLPs);
                // neurons by their activations in the wide model, before anything is narrowed.
                var acc = [Double](repeating: 0, count: wide.hidden)
                for l in wide.denseMLPs.keys { for (i, v) in (cal.states(layer: l) ?? []).enumerated() { acc[i % wide.hidden] += Double(v) * Double(v) } }
                channelImportance = acc.map { $0.squareRoot() }
                let probe = LayerBuilder(source: original, desc: wide, options: o, width: 1, weightScale: 1, calibration: cal)
                for l in wide.denseMLPs.keys.sorted() {
                    precomputedImportance[l] = try probe.importance(l, try MLPWeights.load(original, wide.denseMLPs[l]!, activation: wide.activation))
                }
            }
            let plan = try ViTWidthReduction.plan(source: original, width: width, heads: heads, keepWholeMLPs: Set(layers),
                                                  channelImportance: channelImportance, neuronImportance: precomputedImportance, seed: o.seed)
            log("width \(plan.oldWidth) -> \(width): channels sampled by " + (channelImportance == nil ? "LayerNorm weight norms" : "LayerNorm output norms"))
            reduction = plan
            source = try NarrowedSource(original, plan)
        }
        let desc = try ArchitectureAdapter.describe(source)
        guard desc.moeLayers.isEmpty else {
            throw CheckpointError(.usage, "\(from) is already an MoE checkpoint (\(desc.moeLayers.count) MoE layers); upcycle a dense checkpoint")
        }
        let available = desc.denseMLPs.keys.sorted()
        let layers = try o.layers.resolve(available: available)
        guard !layers.isEmpty else { throw CheckpointError(.usage, "--layers selects no MLP layer (the model has \(available.count))") }
        let format: OutputFormat = o.format == .auto ? (desc.architecture == .llama ? .mixtral : .own) : o.format

        // Option checks, before anything is read or written.
        guard o.experts >= 1 else { throw CheckpointError(.usage, "--experts must be at least 1") }
        guard o.topK >= 1, o.topK <= o.experts else {
            throw CheckpointError(.usage, "--top-k \(o.topK) must be between 1 and --experts \(o.experts)")
        }
        guard o.granularity >= 1 else { throw CheckpointError(.usage, "--granularity must be at least 1") }
        guard o.capacityFactor > 0 else { throw CheckpointError(.usage, "--capacity-factor must be positive") }
        let ffn = desc.ffn, G = o.granularity
        if o.method != .granular && G != 1 {
            throw CheckpointError(.usage, "--granularity applies to --method granular only")
        }
        if o.method == .granular {
            for l in layers {
                let w = source.descriptor(desc.denseMLPs[l]!.fc1)!.shape
                let width = desc.denseMLPs[l]!.transposed ? w[1] : w[0]
                guard width % G == 0 else {
                    let divisors = (2...max(2, min(width, 16))).filter { width % $0 == 0 }.map(String.init).joined(separator: ", ")
                    throw CheckpointError(.usage, "--granularity \(G) does not divide the FFN width \(width) of layer \(l); use a divisor such as \(divisors)")
                }
            }
            guard o.experts % G == 0 else { throw CheckpointError(.usage, "--experts \(o.experts) must be a multiple of --granularity \(G)") }
            guard !o.router.isSoft else { throw CheckpointError(.usage, "--method granular needs a top-k or expert-choice router, not \(o.router.rawValue)") }
            if o.router.isTokenChoice, o.topK % G != 0 {
                throw CheckpointError(.usage, "--top-k \(o.topK) must be a multiple of --granularity \(G) so that every shard is picked once per copy")
            }
        }
        var width = ffn
        switch o.method {
        case .replicate: width = ffn
        case .granular: width = ffn / G
        case .recycle: width = o.expertWidth ?? max(1, ffn / 2)
        }
        if let w = o.expertWidth, o.method != .recycle, w != width {
            throw CheckpointError(.usage, "--expert-width applies to --method recycle; \(o.method.rawValue) experts are \(width) wide")
        }
        guard width >= 1, width <= ffn else { throw CheckpointError(.usage, "--expert-width \(width) must be between 1 and the FFN width \(ffn)") }
        if o.router == .sphero && o.routerInit == .zero {
            throw CheckpointError(.usage, "--router sphero needs --router-init random or hidden (zero queries have no direction)")
        }
        if o.routerInit == .hidden && o.calibrationPath == nil {
            throw CheckpointError(.usage, "--router-init hidden needs --calibration DATA (hidden states to cluster)")
        }
        if format == .mixtral {
            guard desc.architecture == .llama else {
                throw CheckpointError(.usage, "--format mixtral needs a Llama-family input; this is \(desc.architecture.displayName) (use --format own)")
            }
            guard layers == available else { throw CheckpointError(.usage, "the Mixtral layout makes every layer MoE; use --layers all, or --format own for a partial MoE") }
            guard o.router.isTokenChoice && o.router.renormalizes else {
                throw CheckpointError(.usage, "Mixtral routes softmax, top-k, renormalise (= --router topk-softmax); use --format own for \(o.router.rawValue)")
            }
            guard desc.denseMLPs.values.allSatisfy({ $0.fc1Bias == nil && $0.fc2Bias == nil }) else {
                throw CheckpointError(.usage, "Mixtral experts have no biases but this Llama MLP has some; use --format own")
            }
        }
        if desc.gated, desc.denseMLPs.values.contains(where: { $0.fc1Bias != nil || $0.fc2Bias != nil }) {
            throw CheckpointError(.unsupported, "gated MLPs with biases are not supported")
        }
        var calibration = try o.calibrationPath.map { try CalibrationData.load(path: $0, hidden: desc.hidden) }
        if let plan = reduction, let cal = wideCalibration {
            // The states the narrowed model's MLPs see: the kept channels.
            func keep(_ v: [Float]) -> [Float] {
                stride(from: 0, to: v.count, by: plan.oldWidth).flatMap { r in plan.channels.map { v[r + $0] } }
            }
            calibration = CalibrationData(hidden: plan.width, shared: cal.shared.map(keep), perLayer: cal.perLayer.mapValues(keep))
        }

        // Output locations.
        let outURL: URL, configURL: URL?
        var createdDir: URL?
        let fm = FileManager.default
        if to.hasSuffix(".safetensors") {
            outURL = URL(fileURLWithPath: to)
            let dir = outURL.deletingLastPathComponent()
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: dir.path, isDirectory: &isDir), isDir.boolValue else {
                throw CheckpointError(.io, "the folder \(dir.path) for --to does not exist")
            }
            configURL = format == .mixtral ? dir.appendingPathComponent("config.json") : nil
        } else {
            let dir = URL(fileURLWithPath: to)
            var isDir: ObjCBool = false
            if fm.fileExists(atPath: dir.path, isDirectory: &isDir) {
                guard isDir.boolValue else { throw CheckpointError(.io, "--to \(to) exists and is not a folder; name a folder or a .safetensors file") }
            }
            outURL = dir.appendingPathComponent("model.safetensors")
            configURL = format == .mixtral ? dir.appendingPathComponent("config.json") : nil
        }
        let inputFiles = (original as? SafetensorsCheckpoint)?.files.map(\.path) ?? (original as? GGUFCheckpoint).map { [$0.gguf.path] } ?? []
        let inputPaths = Set(inputFiles.map { URL(fileURLWithPath: $0).resolvingSymlinksInPath().path })
        guard !inputPaths.contains(outURL.resolvingSymlinksInPath().path) else {
            throw CheckpointError(.usage, "--to would overwrite the input checkpoint; choose another path")
        }

        let weightScale: Double
        if o.weightScaling {
            let r = Double(o.experts * G * G) / Double(o.topK)
            weightScale = desc.gated ? pow(r, 1.0 / 3.0) : r.squareRoot()
        } else { weightScale = 1 }
        let settings = RoutingSettings(
            router: o.router, experts: o.experts, topK: o.topK, capacityFactor: o.capacityFactor, method: o.method.rawValue,
            granularity: G, expertWidth: width, denseFFN: ffn, weightScale: weightScale, routerInit: o.routerInit.rawValue,
            seed: o.seed, layers: layers, sourceArchitecture: desc.architecture.rawValue, activation: desc.activation.rawValue)

        // The plan: every source tensor in order, the MLPs of MoE layers replaced by router + experts.
        let builder = LayerBuilder(source: source, desc: desc, options: o, width: width, weightScale: Float(weightScale), calibration: calibration)
        builder.precomputedImportance = precomputedImportance
        var plan: [PlannedTensor] = []
        var producers: [() throws -> Payload] = []
        var emitted = Set<Int>()
        var mlpOwner: [String: Int] = [:]
        for l in layers { for n in desc.denseMLPs[l]!.allNames { mlpOwner[n] = l } }
        let H = desc.hidden
        for t in source.tensors {
            if let l = mlpOwner[t.name] {
                guard emitted.insert(l).inserted else { continue }
                let names = MoENames(format: format, layer: l, dense: desc.denseMLPs[l]!)
                plan.append(PlannedTensor(name: names.router, dtype: .F32, shape: [o.experts, H]))
                producers.append { .floats(try builder.router(layer: l)) }
                for e in 0..<o.experts {
                    for part in names.expertParts(e, gated: desc.gated, hasB1: desc.denseMLPs[l]!.fc1Bias != nil,
                                                  hasB2: desc.denseMLPs[l]!.fc2Bias != nil) {
                        let shape: [Int]
                        switch part.kind {
                        case .w1, .wg: shape = [width, H]
                        case .w2: shape = [H, width]
                        case .b1: shape = [width]
                        case .b2: shape = [H]
                        }
                        plan.append(PlannedTensor(name: part.name, dtype: .F32, shape: shape))
                        producers.append { .floats(try builder.expertTensor(layer: l, expert: e, part.kind)) }
                    }
                }
                continue
            }
            if let (dtype, _) = source.passthrough(t.name) {
                plan.append(PlannedTensor(name: t.name, dtype: dtype, shape: t.shape))
                producers.append { .raw(source.passthrough(t.name)!.1) }
            } else {
                plan.append(PlannedTensor(name: t.name, dtype: .F32, shape: t.shape))
                producers.append { .floats(try source.floats(t.name)) }
            }
        }

        var configJSON: JSONValue?
        if format == .mixtral {
            let vocab = source.descriptor("model.embed_tokens.weight")?.shape.first
            configJSON = try LlamaConfig.mixtral(from: desc.config, hidden: H, layers: desc.layerCount, expertWidth: width,
                                                 experts: o.experts, topK: o.topK, vocab: vocab,
                                                 tied: !source.has("lm_head.weight"), routing: settings.json)
        }

        // Write: tensors stream into a temporary file renamed at the end.
        if !to.hasSuffix(".safetensors"), !fm.fileExists(atPath: to) {
            do { try fm.createDirectory(atPath: to, withIntermediateDirectories: true) } catch {
                throw CheckpointError(.io, "cannot create the folder \(to): \(error.localizedDescription)")
            }
            createdDir = URL(fileURLWithPath: to)
        }
        do {
            let writer = try SafetensorsStreamWriter(url: outURL, tensors: plan, metadata: settings.metadata)
            log("writing \(plan.count) tensors to \(outURL.path)")
            for (p, produce) in zip(plan, producers) {
                switch try produce() {
                case .raw(let bytes):
                    try writer.write(p.name, bytes: bytes)
                    source.releasePages(p.name)
                case .floats(let v): try writer.write(p.name, floats: v)
                }
            }
            if let configURL, let configJSON {
                // The config goes first so a finished checkpoint always has its config.
                try atomicWrite(Data((configJSON.serialized(pretty: true) + "\n").utf8), to: configURL)
            }
            try writer.finish()
        } catch {
            if let c = createdDir { try? fm.removeItem(at: c) }
            else if let configURL, !fm.fileExists(atPath: outURL.path) { try? fm.removeItem(at: configURL) }
            throw error
        }

        var report: VerifyReport?
        if o.verify {
            report = try Verifier.verify(dense: source, denseDescription: desc, moePath: outURL.path, layers: layers,
                                         calibration: calibration, tokens: o.verifyTokens, seed: o.seed, log: log)
        }
        return UpcycleResult(checkpoint: outURL, config: configURL, layers: layers, settings: settings,
                             tensorCount: plan.count, verification: report)
    }
}

enum Payload {
    case raw(UnsafeRawBufferPointer)
    case floats([Float])
}

/// Output tensor names for one MoE layer.
struct MoENames {
    enum Kind { case w1, b1, wg, w2, b2 }
    let format: OutputFormat
    let prefix: String

    init(format: OutputFormat, layer: Int, dense: DenseMLPNames) {
        self.format = format
        if format == .mixtral, let g = dense.gate, g.hasSuffix("mlp.gate_proj.weight") {
            prefix = String(g.dropLast("mlp.gate_proj.weight".count)) + "block_sparse_moe."
        } else {
            prefix = "blocks.\(layer).moe."
        }
    }

    var router: String { format == .mixtral ? prefix + "gate.weight" : prefix + "router.weight" }

    func expertParts(_ e: Int, gated: Bool, hasB1: Bool, hasB2: Bool) -> [(kind: Kind, name: String)] {
        let p = prefix + "experts.\(e)."
        if format == .mixtral { return [(.wg, p + "w1.weight"), (.w2, p + "w2.weight"), (.w1, p + "w3.weight")] }
        if gated { return [(.wg, p + "gate.weight"), (.w1, p + "up.weight"), (.w2, p + "down.weight")] }
        var parts: [(Kind, String)] = [(.w1, p + "fc1.weight")]
        if hasB1 { parts.append((.b1, p + "fc1.bias")) }
        parts.append((.w2, p + "fc2.weight"))
        if hasB2 { parts.append((.b2, p + "fc2.bias")) }
        return parts
    }
}

/// Builds routers and experts for one layer at a time, keeping only that
/// layer's dense MLP and the current expert in memory.
final class LayerBuilder {
    let source: TensorSource
    let desc: ModelDescription
    let o: UpcycleOptions
    let width: Int
    let weightScale: Float
    let calibration: CalibrationData?
    private var layer = -1
    private var dense: MLPWeights?
    private var specs: [ExpertSpec] = []
    private var cachedExpert: (Int, MLPWeights)?
    /// Importance per layer computed elsewhere (from the wider model before a width reduction).
    var precomputedImportance: [Int: [Double]] = [:]

    init(source: TensorSource, desc: ModelDescription, options: UpcycleOptions, width: Int, weightScale: Float, calibration: CalibrationData?) {
        self.source = source; self.desc = desc; o = options; self.width = width
        self.weightScale = weightScale; self.calibration = calibration
    }

    private func load(_ l: Int) throws {
        guard l != layer else { return }
        layer = l
        cachedExpert = nil
        let d = try MLPWeights.load(source, desc.denseMLPs[l]!, activation: desc.activation)
        dense = d
        specs = try makeSpecs(l, d)
    }

    func makeSpecs(_ l: Int, _ d: MLPWeights) throws -> [ExpertSpec] {
        let E = o.experts, G = o.granularity, s = weightScale
        // Weight scaling multiplies every weight matrix by s; plain MLPs are
        // degree-2 homogeneous (for ReLU), so b2 goes with s^2, gated ones s^3.
        let b2Scale = o.weightScaling ? (d.gated ? s * s * s : s * s) : 1
        switch o.method {
        case .replicate:
            return Array(repeating: ExpertSpec(neurons: Array(0..<d.width), inScale: s, outScale: s, biasScale: b2Scale), count: E)
        case .granular:
            // Expert e = copy e/G, shard e%G. Each chosen copy contributes all G
            // shards with weights summing to 1/copies, so shards' outputs are
            // multiplied by G (and b2 kept whole) to give back the dense MLP.
            let shard = d.width / G
            return (0..<E).map { e in
                let sh = e % G
                let neurons = Array(sh * shard..<(sh + 1) * shard)
                return o.weightScaling ? ExpertSpec(neurons: neurons, inScale: s, outScale: s, biasScale: b2Scale)
                                       : ExpertSpec(neurons: neurons, inScale: 1, outScale: Float(G), biasScale: 1)
            }
        case .recycle:
            let importance = try self.importance(l, d)
            return (0..<E).map { e in
                var r = rng(o.seed, 2, UInt64(l), UInt64(e))
                let picked = ImportanceSampling.sample(weights: importance, count: width, rng: &r).sorted()
                return ExpertSpec(neurons: picked, inScale: s, outScale: s, biasScale: b2Scale)
            }
        }
    }

    /// Per hidden neuron: the L2 norm of its activation over the calibration
    /// tokens (MoE Jetpack), or without calibration the product of the norms of
    /// its input and output weights.
    func importance(_ l: Int, _ d: MLPWeights) throws -> [Double] {
        if let known = precomputedImportance[l], known.count == d.width { return known }
        let H = d.hidden
        if let states = calibration?.states(layer: l) {
            var acc = [Double](repeating: 0, count: d.width)
            let T = states.count / H
            for t in 0..<T {
                let h = MoEMath.hiddenUnits(d, states[t * H..<(t + 1) * H])
                for i in 0..<d.width { acc[i] += h[i] * h[i] }
            }
            return acc.map { $0.squareRoot() }
        }
        return (0..<d.width).map { i in
            var a = 0.0, b = 0.0, g = 0.0
            for j in 0..<H { a += Double(d.w1[i * H + j] * d.w1[i * H + j]) }
            for o in 0..<H { b += Double(d.w2[o * d.width + i] * d.w2[o * d.width + i]) }
            if let wg = d.wg { for j in 0..<H { g += Double(wg[i * H + j] * wg[i * H + j]) } } else { g = 1 }
            return (a * b * g).squareRoot()
        }
    }

    func router(layer l: Int) throws -> [Float] {
        let E = o.experts, H = desc.hidden
        // Granular: rows are tied per copy (block of G experts), so top-k picks whole copies.
        let groups = o.method == .granular ? E / o.granularity : E
        let rowsPerGroup = E / groups
        var base: [Float]
        switch o.routerInit {
        case .zero: base = [Float](repeating: 0, count: groups * H)
        case .random:
            var r = rng(o.seed, 1, UInt64(l))
            base = (0..<(groups * H)).map { _ in r.nextGaussian() * o.routerStd }
            if o.router == .sphero { base = orthonormalRows(base, rows: groups, cols: H) }
        case .hidden:
            guard let states = calibration?.states(layer: l) else {
                throw CheckpointError(.usage, "the calibration data has no hidden states for layer \(l)")
            }
            var r = rng(o.seed, 3, UInt64(l))
            base = try KMeans.normalizedCentroids(states, dim: H, clusters: groups, rng: &r)
        }
        var out = [Float](repeating: 0, count: E * H)
        for e in 0..<E { let g = e / rowsPerGroup; for j in 0..<H { out[e * H + j] = base[g * H + j] } }
        return out
    }

    func expertTensor(layer l: Int, expert e: Int, _ kind: MoENames.Kind) throws -> [Float] {
        try load(l)
        let ex: MLPWeights
        if let c = cachedExpert, c.0 == e { ex = c.1 } else {
            ex = specs[e].build(from: dense!)
            cachedExpert = (e, ex)
        }
        switch kind {
        case .w1: return ex.w1
        case .wg: return ex.wg!
        case .w2: return ex.w2
        case .b1: return ex.b1!
        case .b2: return ex.b2!
        }
    }
}

/// Gram–Schmidt on the rows (when there are no more rows than columns), then unit length.
public func orthonormalRows(_ a: [Float], rows: Int, cols: Int) -> [Float] {
    var v = a.map(Double.init)
    for r in 0..<rows {
        if rows <= cols {
            for p in 0..<r {
                var d = 0.0
                for j in 0..<cols { d += v[r * cols + j] * v[p * cols + j] }
                for j in 0..<cols { v[r * cols + j] -= d * v[p * cols + j] }
            }
        }
        var n = 0.0
        for j in 0..<cols { n += v[r * cols + j] * v[r * cols + j] }
        n = max(n.squareRoot(), 1e-12)
        for j in 0..<cols { v[r * cols + j] /= n }
    }
    return v.map(Float.init)
}

/// Seeded k-means++ with Lloyd iterations; the router rows of `--router-init hidden`
/// (mergekit-style: one normalised mean hidden state per group of tokens).
public enum KMeans {
    public static func normalizedCentroids(_ x: [Float], dim: Int, clusters k: Int, rng: inout SplitMix64, iterations: Int = 25) throws -> [Float] {
        let n = x.count / dim
        guard n >= k else {
            throw CheckpointError(.usage, "--router-init hidden needs at least \(k) calibration tokens per layer (got \(n))")
        }
        func dist(_ i: Int, _ c: [Double], _ ci: Int) -> Double {
            var s = 0.0
            for j in 0..<dim { let d = Double(x[i * dim + j]) - c[ci * dim + j]; s += d * d }
            return s
        }
        var c = [Double](repeating: 0, count: k * dim)
        let first = Int(rng.next() % UInt64(n))
        for j in 0..<dim { c[j] = Double(x[first * dim + j]) }
        var best = (0..<n).map { dist($0, c, 0) }
        for ci in 1..<k {
            let total = best.reduce(0, +)
            var pick = n - 1
            if total > 0 {
                var u = Double(rng.next() >> 11) / Double(1 << 53) * total
                for i in 0..<n { u -= best[i]; if u <= 0 { pick = i; break } }
            } else { pick = ci % n }
            for j in 0..<dim { c[ci * dim + j] = Double(x[pick * dim + j]) }
            for i in 0..<n { best[i] = min(best[i], dist(i, c, ci)) }
        }
        var assign = [Int](repeating: 0, count: n)
        for _ in 0..<iterations {
            var changed = false
            for i in 0..<n {
                var bi = 0, bd = Double.infinity
                for ci in 0..<k { let d = dist(i, c, ci); if d < bd { bd = d; bi = ci } }
                if assign[i] != bi { assign[i] = bi; changed = true }
            }
            var sums = [Double](repeating: 0, count: k * dim), counts = [Int](repeating: 0, count: k)
            for i in 0..<n { counts[assign[i]] += 1; for j in 0..<dim { sums[assign[i] * dim + j] += Double(x[i * dim + j]) } }
            for ci in 0..<k where counts[ci] > 0 { for j in 0..<dim { c[ci * dim + j] = sums[ci * dim + j] / Double(counts[ci]) } }
            if !changed { break }
        }
        return unitRows(c, k: k, dim: dim)
    }

    /// Unit-length rows (not orthogonalised: the centroids' directions are the point).
    static func unitRows(_ c: [Double], k: Int, dim: Int) -> [Float] {
        var out = [Float](repeating: 0, count: c.count)
        for r in 0..<k {
            var n = 0.0
            for j in 0..<dim { n += c[r * dim + j] * c[r * dim + j] }
            n = max(n.squareRoot(), 1e-12)
            for j in 0..<dim { out[r * dim + j] = Float(c[r * dim + j] / n) }
        }
        return out
    }
}
