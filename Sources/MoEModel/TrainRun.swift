import Foundation
#if canImport(Glibc)
import Glibc
#endif
import MoECheckpoint
import MoECompute
import Yams

/// A training run on disk: `--out DIR` holds `config.json` (the resolved
/// config), `metrics.jsonl`, `model.safetensors` + `optimizer.safetensors`
/// (atomic writes at every evaluation and at the end) and `eval.json`.
public final class TrainRun {
    public let config: TrainConfig
    public let out: URL
    public let trainer: Trainer
    public var log: (String) -> Void = { print($0) }
    public var progress: ((StepMetrics, Int) -> Void)?
    /// Mean test cross-entropy of the last evaluation.
    public private(set) var evalLoss: Double?
    private let started = Date()

    /// A run of the ViT on image datasets.
    public convenience init(config: TrainConfig, model: ViT, out: URL, data: (train: ImageDataset, test: ImageDataset)) throws {
        try self.init(config: config, trainer: try Trainer(config: config, model: model, train: data.train, test: data.test), out: out)
    }

    /// A run of any model and batch source.
    public init(config: TrainConfig, trainer: Trainer, out: URL) throws {
        self.config = config
        self.out = out
        self.trainer = trainer
        createdFolder = !FileManager.default.fileExists(atPath: out.path)
        writes = trainer.communicator.rank == 0
        guard writes else { return }
        do { try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true) } catch {
            throw ModelError.io("cannot create the output folder \(out.path) (\(ModelError.reason(error))): choose a writable --out")
        }
        try atomicWrite(try JSONEncoder.sorted.encode(config), to: out.appendingPathComponent("config.json"))
    }

    /// The config a run folder's `config.json` holds, as written (every key is
    /// there, and an absent optional is nil, not a default as for user files).
    public static func storedConfig(_ dir: URL) throws -> TrainConfig {
        let url = dir.appendingPathComponent("config.json")
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw ModelError.badConfig("\(dir.path) has no config.json: name a folder written by moe-gpu train")
        }
        do { return try JSONDecoder().decode(TrainConfig.self, from: data) } catch {
            throw ModelError.badConfig("\(url.path) is not a config written by moe-gpu train (\(oneLine(error)))")
        }
    }

    /// Reads a JSON or YAML config (by extension `.yaml`/`.yml`). Keys left out
    /// keep their defaults (`moe-gpu train --print-config` shows them all); an
    /// unknown key is an error naming it.
    public static func loadConfig(_ path: String) throws -> TrainConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ModelError.badConfig("cannot read config file \(path)")
        }
        let user: [String: Any]
        if path.hasSuffix(".yaml") || path.hasSuffix(".yml") {
            do {
                // Composed to nodes and converted here: Yams's own constructor traps on
                // a mapping key that is not a string (found by the config fuzzer).
                guard let node = try Yams.compose(yaml: String(decoding: data, as: UTF8.self)),
                      let object = try plainYAML(node, path: path) as? [String: Any] else {
                    throw ModelError.badConfig("\(path) is not a YAML mapping")
                }
                user = object
            } catch let e as ModelError { throw e } catch {
                throw ModelError.badConfig("\(path) is not valid YAML (\(oneLine(error)))")
            }
        } else {
            guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw ModelError.badConfig("\(path) is not a JSON object")
            }
            user = object
        }
        var defaults = try JSONSerialization.jsonObject(with: try JSONEncoder().encode(TrainConfig())) as! [String: Any]
        // An MoE section the user gives starts from the MoE defaults for its router.
        if let moe = (user["model"] as? [String: Any])?["moe"] as? [String: Any] {
            let router = moe["router"] as? String ?? "sphero"
            var model = defaults["model"] as! [String: Any]
            model["moe"] = try JSONSerialization.jsonObject(with: try JSONEncoder().encode(Recipe.moe(router: router)))
            defaults["model"] = model
        }
        // A language-model section starts from the default Llama (and Mixtral routing for its MoE).
        if let lm = user["lm"] as? [String: Any] {
            var lmDefaults = try JSONSerialization.jsonObject(with: try JSONEncoder().encode(LMRecipe.denseModel())) as! [String: Any]
            if lm["moe"] is [String: Any] {
                lmDefaults["moe"] = try JSONSerialization.jsonObject(with: try JSONEncoder().encode(LMRecipe.mixtralMoE()))
            }
            defaults["lm"] = lmDefaults
        }
        var unknown: [String] = []
        let merged = merge(defaults, user, path: "", unknown: &unknown)
        guard unknown.isEmpty else {
            throw ModelError.badConfig("\(path): unknown key\(unknown.count > 1 ? "s" : "") \(unknown.joined(separator: ", ")) (see moe-gpu train --print-config)")
        }
        do {
            return try JSONDecoder().decode(TrainConfig.self, from: try JSONSerialization.data(withJSONObject: merged))
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw ModelError.badConfig("\(path): wrong type for '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))'")
        } catch {
            throw ModelError.badConfig("\(path) is not a valid training config (\(oneLine(error)))")
        }
    }

    /// `user` laid over `defaults`, recursively; keys the defaults lack are reported.
    /// Optional settings (absent from the defaults) are accepted where known.
    static func merge(_ defaults: [String: Any], _ user: [String: Any], path: String, unknown: inout [String]) -> [String: Any] {
        let optional: Set<String> = ["data", "trainExamples", "testExamples", "moe", "capacityFactor", "logitNoise",
                                     "lm", "evalData", "evalBatchSize", "checkpointEvery", "ropeScaling", "bosID", "eosID", "padID"]
        var out = defaults
        for (k, v) in user {
            let full = path.isEmpty ? k : "\(path).\(k)"
            if let d = defaults[k] as? [String: Any], let u = v as? [String: Any] {
                out[k] = merge(d, u, path: full, unknown: &unknown)
            } else if defaults[k] != nil || optional.contains(k) {
                out[k] = v
            } else {
                unknown.append(full)
            }
        }
        return out
    }

    /// The files a run writes into its folder.
    public static let runFiles = ["config.json", "metrics.jsonl", "model.safetensors", "optimizer.safetensors", "eval.json", "checkpoints"]
    /// Sub-folders the train command puts baseline runs in.
    static let baselineFolders = ["dense-continued", "dense-equal-flops"]

    /// Removes a run's files from `dir` (a fresh start in a folder that held one).
    /// Rank 0 alone touches run folders in a data-parallel run.
    public static func clearRun(_ dir: URL) {
        guard Distributed.world.rank == 0 else { return }
        for f in runFiles { try? FileManager.default.removeItem(at: dir.appendingPathComponent(f)) }
        for f in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] where isModelFile(f) {
            try? FileManager.default.removeItem(at: dir.appendingPathComponent(f))
        }
    }

    /// Whether `dir` holds (part of) a run.
    public static func holdsRun(_ dir: URL) -> Bool {
        runFiles.contains { FileManager.default.fileExists(atPath: dir.appendingPathComponent($0).path) }
            || FileManager.default.fileExists(atPath: dir.appendingPathComponent("model.safetensors.index.json").path)
    }

    /// The folder of a fresh run. An explicit folder that holds a run is refused
    /// unless `overwrite` (then that run's files are removed first); without one,
    /// the first of `base`, `base-2`, `base-3`, ... that holds no run, as
    /// experiment trackers do, so a second run never appends to the first's metrics.
    /// Under MPI rank 0 decides (and clears) and every rank gets its answer.
    public static func freshOutput(explicit: String?, base: String, overwrite: Bool) throws -> URL {
        URL(fileURLWithPath: try Distributed.world.fromRoot { try chooseOutput(explicit: explicit, base: base, overwrite: overwrite).path })
    }

    private static func chooseOutput(explicit: String?, base: String, overwrite: Bool) throws -> URL {
        if let explicit {
            let dir = URL(fileURLWithPath: explicit)
            guard holdsRun(dir) else { return dir }
            guard overwrite else {
                throw ModelError.badConfig("\(explicit) already holds a run: continue it with --resume \(explicit), replace it with --overwrite, or choose another --out")
            }
            for folder in [dir] + baselineFolders.map(dir.appendingPathComponent) { clearRun(folder) }
            return dir
        }
        var n = 1
        while true {
            let dir = URL(fileURLWithPath: n == 1 ? base : "\(base)-\(n)")
            if !holdsRun(dir) { return dir }
            n += 1
        }
    }

    /// Drops metrics logged after `step` (a run stopped after logging past its last checkpoint).
    public static func trimMetrics(_ dir: URL, after step: Int) throws {
        let url = dir.appendingPathComponent("metrics.jsonl")
        guard let data = FileManager.default.contents(atPath: url.path) else { return }
        let kept = String(decoding: data, as: UTF8.self).split(separator: "\n").filter { line in
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let s = (o["step"] as? NSNumber)?.intValue else { return false }
            return s <= step
        }
        try atomicWrite(Data((kept.joined(separator: "\n") + (kept.isEmpty ? "" : "\n")).utf8), to: url)
    }

    // MARK: Checkpoints
    //
    // A checkpoint is one unit: `checkpoints/step-NNNNNNNN/` holds the model and
    // the optimizer of one step. Both files are written into a hidden partial
    // folder, flushed, and the folder is renamed into place, so a kill at any
    // moment leaves either the whole new checkpoint or none of it; the last two
    // are kept. `model.safetensors` beside them is a hard link to the latest
    // model, for eval, export, plot and --init.

    public static let checkpointsFolder = "checkpoints"

    /// A checkpoint folder's model and optimizer: single files from one
    /// process; from N ranks, Hugging Face sharded sets (`model-0000r-of-0000N.safetensors`
    /// with `model.safetensors.index.json`, the optimizer likewise), one shard per rank.
    static func checkpointFile(_ folder: URL, _ kind: String) -> URL? {
        let fm = FileManager.default
        for name in ["\(kind).safetensors.index.json", "\(kind).safetensors"] where fm.fileExists(atPath: folder.appendingPathComponent(name).path) {
            return folder.appendingPathComponent(name)
        }
        return nil
    }

    /// The shard file of rank `rank` of `ranks` (Hugging Face's numbering, from 1).
    static func shardName(_ kind: String, rank: Int, of ranks: Int) -> String {
        String(format: "%@-%05d-of-%05d.safetensors", kind, rank + 1, ranks)
    }

    /// The newest complete checkpoint of a run folder and its step: a
    /// `checkpoints/step-N` folder, or (runs written before checkpoints were one
    /// unit) the folder's own model.safetensors + optimizer.safetensors.
    public static func latestCheckpoint(_ dir: URL) -> (folder: URL, step: Int)? {
        let fm = FileManager.default
        let root = dir.appendingPathComponent(checkpointsFolder)
        let steps = ((try? fm.contentsOfDirectory(atPath: root.path)) ?? []).compactMap { name -> Int? in
            guard name.hasPrefix("step-") else { return nil }
            return Int(name.dropFirst(5))
        }.sorted(by: >)
        for step in steps {
            let folder = root.appendingPathComponent(String(format: "step-%08d", step))
            if checkpointFile(folder, "model") != nil, checkpointFile(folder, "optimizer") != nil { return (folder, step) }
        }
        if fm.fileExists(atPath: dir.appendingPathComponent("optimizer.safetensors").path),
           fm.fileExists(atPath: dir.appendingPathComponent("model.safetensors").path),
           let opt = try? SafetensorsFile(path: dir.appendingPathComponent("optimizer.safetensors").path),
           let step = opt.metadata["step"].flatMap(Int.init) { return (dir, step) }
        return nil
    }

    /// Restores model weights, AdamW moments and the step from a run folder's
    /// latest checkpoint (refusing a model and an optimizer of different steps),
    /// and drops the metrics logged after that step (they will be logged again).
    /// Single files or shards, written by any number of ranks: each rank reads
    /// the weights and the moments it holds (its share under ZeRO-1).
    public func resume(from dir: URL) throws {
        // Ranks read their own parts: one that fails must not leave the others waiting in the first step.
        var failure: Error?
        do { try restore(from: dir) } catch { failure = error }
        if try trainer.communicator.anyRank(failure != nil) {
            throw failure ?? ModelError.badInput("another rank could not read its part of the checkpoint in \(dir.path) (its error is in its output)")
        }
    }

    private func restore(from dir: URL) throws {
        guard let (folder, _) = Self.latestCheckpoint(dir), let modelURL = Self.checkpointFile(folder, "model"),
              let optURL = Self.checkpointFile(folder, "optimizer") else {
            throw ModelError.badInput("\(dir.path) holds no checkpoint to resume from (it stopped before its first one): start the run again with --overwrite")
        }
        let model = trainer.model
        let modelFile = try ModelCheckpoint.open(modelURL.path)
        let opt = try SafetensorsCheckpoint(path: optURL.path)
        guard let s = opt.metadata["step"], let step = Int(s) else { throw ModelError.badInput("\(optURL.path) has no step") }
        guard let ms = modelFile.metadata["step"], Int(ms) == step else {
            throw ModelError.badInput("\(folder.path): the model is from step \(modelFile.metadata["step"] ?? "?") but the optimizer from step \(step), so they are not one checkpoint (an older moe-gpu was stopped between the two writes): start the run again with --overwrite")
        }
        if let seed = modelFile.metadata["moe-gpu.seed"], seed != "\(model.params.seed)" {
            throw ModelError.badInput("\(folder.path) was trained by a model built with seed \(seed), this one has seed \(model.params.seed): its dropout and routing noise would differ; resume with the run's own config.json")
        }
        try ModelCheckpoint.load(modelURL.path, into: model)
        // Moments are stored per checkpoint tensor (one expert, one projection:
        // any expert-parallel layout reads its own); older runs stored them per parameter.
        let tensors = Dictionary(grouping: model.checkpointTensors, by: { ObjectIdentifier($0.parameter) })
        for p in model.params.all where trainer.optimizer.holds(p) {
            let (m, v) = try trainer.optimizer.moments(of: p)
            let parts = tensors[ObjectIdentifier(p)] ?? []
            if !parts.isEmpty, parts.allSatisfy({ opt.has("\($0.name).exp_avg") && opt.has("\($0.name).exp_avg_sq") }) {
                for t in parts {
                    try m.view(offset: t.offset, shape: t.shape).write(try opt.floats("\(t.name).exp_avg"))
                    try v.view(offset: t.offset, shape: t.shape).write(try opt.floats("\(t.name).exp_avg_sq"))
                }
            } else if let d = opt.descriptor("\(p.name).exp_avg"), opt.has("\(p.name).exp_avg_sq") {
                // Whole-parameter moments; a rank holding some experts takes their rows.
                let rows = p.expertRows ?? 0..<max(p.shape.first ?? 1, 1), per = p.count / max(p.shape.first ?? 1, 1)
                guard d.count == (p.expertRows == nil ? p.count : p.globalCount) else {
                    throw ModelError.badInput("the optimizer state in \(folder.path) holds \(p.name)'s moments with shape \(d.shape), the model has \(p.shape)")
                }
                let range = p.expertRows == nil ? 0..<p.count : (rows.lowerBound * per)..<(rows.upperBound * per)
                try m.write(Array(try opt.floats("\(p.name).exp_avg")[range]))
                try v.write(Array(try opt.floats("\(p.name).exp_avg_sq")[range]))
            } else {
                throw ModelError.badInput("the optimizer state in \(folder.path) lacks the moments of \(parts.first?.name ?? p.name)")
            }
        }
        trainer.fastForward(to: step, nonFiniteSkipped: opt.metadata["moe-gpu.nonfinite_skipped"].flatMap(Int.init) ?? 0)
        if writes { try Self.trimMetrics(out, after: step) }
    }

    private var lastSavedStep = -1

    /// Writes the checkpoint of the current step (see above) and keeps the last
    /// two. Under MPI every rank writes its shard (the parameters it owns and
    /// their moments) into rank 0's partial folder; rank 0 writes the indexes
    /// and moves the folder into place once every rank's shard is flushed.
    public func saveCheckpoint() throws {
        defer { lastSavedStep = trainer.step }
        let fm = FileManager.default, model = trainer.model, step = trainer.step
        let comm = trainer.communicator, ranks = comm.size
        let root = out.appendingPathComponent(Self.checkpointsFolder)
        let name = String(format: "step-%08d", step)
        let partial = URL(fileURLWithPath: try comm.fromRoot {
            try fm.createDirectory(at: root, withIntermediateDirectories: true)
            // Partial folders of runs killed while writing are garbage.
            for name in (try? fm.contentsOfDirectory(atPath: root.path)) ?? [] where name.hasPrefix(".") {
                try? fm.removeItem(at: root.appendingPathComponent(name))
            }
            let partial = root.appendingPathComponent(".\(name).partial-\(getpid())")
            try fm.createDirectory(at: partial, withIntermediateDirectories: true)
            return partial.path
        })
        var failure: Error?
        // What this rank wrote, one "kind<TAB>tensor<TAB>bytes" line each, for rank 0's indexes.
        var listing: [String] = []
        do {
            // The seed the model's random streams (dropout, routing noise) derive from, for resume to check.
            let modelMeta = ["step": "\(step)", "moe-gpu.seed": "\(model.params.seed)"]
            let optMeta = ["format": "pt", "step": "\(step)", "moe-gpu.nonfinite_skipped": "\(trainer.nonFiniteSkipped)"]
            // Each whole parameter once, by its owner; each expert-parallel part by its owner among
            // the ranks holding the same experts (one per group); everything from a single process.
            let mine: (Parameter) -> Bool = { [trainer] p in
                ranks == 1 || (p.expertRows != nil ? trainer.ownership.replicaOwner(of: p) == Distributed.expertReplicas.rank
                               : trainer.ownership.owner(of: p) == comm.rank)
            }
            try ModelCheckpoint.save(model, to: partial.appendingPathComponent(ranks == 1 ? "model.safetensors" : Self.shardName("model", rank: comm.rank, of: ranks)),
                                     metadata: modelMeta, only: mine)
            let written = model.checkpointTensors.filter { mine($0.parameter) }
            listing = written.map { "model\t\($0.name)\t\(4 * $0.count)" }
            let moments = written.filter { $0.parameter.trainable }
            let writer = try SafetensorsStreamWriter(
                url: partial.appendingPathComponent(ranks == 1 ? "optimizer.safetensors" : Self.shardName("optimizer", rank: comm.rank, of: ranks)),
                tensors: moments.flatMap { [PlannedTensor(name: "\($0.name).exp_avg", dtype: .F32, shape: $0.shape),
                                            PlannedTensor(name: "\($0.name).exp_avg_sq", dtype: .F32, shape: $0.shape)] },
                metadata: optMeta)
            for t in moments {
                let (m, v) = try trainer.optimizer.moments(of: t.parameter)
                try writer.write("\(t.name).exp_avg", floats: try m.view(offset: t.offset, shape: t.shape).floats())
                try writer.write("\(t.name).exp_avg_sq", floats: try v.view(offset: t.offset, shape: t.shape).floats())
                listing += ["optimizer\t\(t.name).exp_avg\t\(4 * t.count)", "optimizer\t\(t.name).exp_avg_sq\t\(4 * t.count)"]
            }
            try writer.finish()
        } catch { failure = error }
        // Every rank's shard is flushed, or the checkpoint does not count.
        if try comm.anyRank(failure != nil) {
            if writes { try? fm.removeItem(at: partial) }
            throw failure ?? ModelError.io("another rank could not write its shard of the step-\(step) checkpoint (its error is in its output); the previous checkpoint is kept")
        }
        let listings = try (0..<ranks).map { r in try comm.broadcast(r == comm.rank ? listing.joined(separator: "\n") : "", root: r) }
        _ = try comm.fromRoot {
            do { try self.placeCheckpoint(partial, name: name, listings: listings) } catch {
                try? fm.removeItem(at: partial)
                throw error
            }
            return ""
        }
    }

    /// Rank 0's part of `saveCheckpoint`: the indexes of a sharded set, the
    /// rename into place, the run folder's links to the latest model, the
    /// last two kept.
    private func placeCheckpoint(_ partial: URL, name: String, listings: [String]) throws {
        let fm = FileManager.default, ranks = listings.count
        let root = out.appendingPathComponent(Self.checkpointsFolder)
        var modelFiles = ["model.safetensors"]
        if ranks > 1 {
            for kind in ["model", "optimizer"] {
                var map: [(name: String, file: String)] = [], total = 0
                for (r, text) in listings.enumerated() {
                    for line in text.split(separator: "\n") {
                        let f = line.split(separator: "\t")
                        guard f.count == 3, f[0] == kind else { continue }
                        map.append((String(f[1]), Self.shardName(kind, rank: r, of: ranks)))
                        total += Int(f[2]) ?? 0
                    }
                }
                try ModelCheckpoint.writeIndex(to: partial.appendingPathComponent("\(kind).safetensors.index.json"), weightMap: map, totalSize: total)
            }
            modelFiles = (0..<ranks).map { Self.shardName("model", rank: $0, of: ranks) } + ["model.safetensors.index.json"]
        }
        try Self.syncDirectory(partial)
        let final = root.appendingPathComponent(name)
        if fm.fileExists(atPath: final.path) {
            // The same step saved again: move the old one aside first (rename cannot replace a folder).
            let old = root.appendingPathComponent(".\(name).old-\(getpid())")
            guard rename(final.path, old.path) == 0 else { throw ModelError.badInput("cannot replace \(final.path): \(String(cString: strerror(errno)))") }
            try? fm.removeItem(at: old)
        }
        guard rename(partial.path, final.path) == 0 else {
            throw ModelError.badInput("cannot move the checkpoint into \(final.path): \(String(cString: strerror(errno)))")
        }
        try Self.syncDirectory(root)
        // The run folder's model: hard links to the latest model's files, each
        // swapped in atomically (the index last), then the files of another layout removed.
        for file in modelFiles {
            let top = out.appendingPathComponent(file), link = out.appendingPathComponent(".\(file).link-\(getpid())")
            unlink(link.path)
            if Glibc.link(final.appendingPathComponent(file).path, link.path) != 0 || rename(link.path, top.path) != 0 {
                unlink(link.path)
                try atomicWrite(try Data(contentsOf: final.appendingPathComponent(file)), to: top)
            }
        }
        for file in (try? fm.contentsOfDirectory(atPath: out.path)) ?? [] where Self.isModelFile(file) && !modelFiles.contains(file) {
            try? fm.removeItem(at: out.appendingPathComponent(file))
        }
        // Only the last two.
        let older = ((try? fm.contentsOfDirectory(atPath: root.path)) ?? []).filter { $0.hasPrefix("step-") }.sorted().dropLast(2)
        for o in older { try? fm.removeItem(at: root.appendingPathComponent(o)) }
    }

    /// The latest model of a run folder (or any folder holding one): a
    /// multi-rank run's index, or its `model.safetensors`; nil when it has neither.
    public static func modelFile(in dir: URL) -> URL? { checkpointFile(dir, "model") }

    /// A run folder's model file of either layout: `model.safetensors`, a shard, the index.
    static func isModelFile(_ name: String) -> Bool {
        name == "model.safetensors" || name == "model.safetensors.index.json"
            || (name.hasPrefix("model-") && name.contains("-of-") && name.hasSuffix(".safetensors"))
    }

    static func syncDirectory(_ dir: URL) throws {
        let fd = open(dir.path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw ModelError.badInput("cannot open \(dir.path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw ModelError.badInput("cannot flush \(dir.path): \(String(cString: strerror(errno)))") }
    }

    /// Whether this run made its folder (so a failed start may remove it).
    private let createdFolder: Bool
    /// Only rank 0 of a data-parallel run writes (the ranks hold the same weights).
    private let writes: Bool

    /// Trains to `config.steps` (or stops after step `until`, as an interrupted
    /// run would); returns the final test accuracy. A run that fails before
    /// its first checkpoint (a kernel that does not build, a lost device, a bad
    /// first batch) removes what it wrote: no half-run folder is left behind.
    @discardableResult
    public func run(until: Int? = nil) throws -> (accuracy: Double, last: StepMetrics?) {
        do { return try runSteps(until: until) } catch {
            if writes, !(error is TrainingStopped), lastSavedStep < 0, Self.latestCheckpoint(out) == nil {
                Self.clearRun(out)
                if createdFolder { try? FileManager.default.removeItem(at: out) }
            }
            throw error
        }
    }

    private func runSteps(until: Int?) throws -> (accuracy: Double, last: StepMetrics?) {
        // Ranks other than 0 log nowhere.
        let metricsURL = writes ? out.appendingPathComponent("metrics.jsonl") : URL(fileURLWithPath: "/dev/null")
        if !FileManager.default.fileExists(atPath: metricsURL.path) { _ = FileManager.default.createFile(atPath: metricsURL.path, contents: nil) }
        let metrics = try FileHandle(forWritingTo: metricsURL)
        defer { try? metrics.close() }
        try metrics.seekToEnd()
        var last: StepMetrics?
        var accuracy = 0.0
        // Tokens/s over the logging window: wall time between log lines (each
        // step ends in its one host read, so no extra finish is needed).
        var windowStart = Date(), windowTokens = 0.0, rate = 0.0
        let tokensPerStep = Double(config.batchSize * config.gradientAccumulation * trainer.model.tokensPerExample)
        while trainer.step < min(config.steps, until ?? config.steps) {
            // Ranks stop at the same step: mpirun's SIGTERM reaches them at different moments.
            let comm = trainer.communicator
            if let signal = try comm.anyRank(StopSignal.received != nil) ? (StopSignal.received ?? SIGTERM) : nil {
                // Asked to stop (Ctrl-C, kill): the step in flight is done; keep it.
                if lastSavedStep != trainer.step { try saveCheckpoint() }
                throw TrainingStopped(signal: signal, step: trainer.step, out: out)
            }
            var m = try trainer.trainStep()
            windowTokens += tokensPerStep
            let isLast = trainer.step == config.steps || trainer.step == until
            if trainer.step % config.logEvery == 0 || isLast || rate == 0 {
                rate = windowTokens / max(Date().timeIntervalSince(windowStart), 1e-9)
                windowStart = Date(); windowTokens = 0
            }
            m.tokensPerSecond = rate
            if (config.evalEvery > 0 && trainer.step % config.evalEvery == 0) || isLast {
                let eval = try trainer.evaluateWithLoss(limit: config.testExamples)
                accuracy = eval.accuracy
                m.accuracy = accuracy
                m.evalLoss = eval.loss
                evalLoss = eval.loss
                if config.checkpointEvery.map({ $0 > 0 && trainer.step % $0 == 0 }) ?? true || isLast { try saveCheckpoint() }
                windowStart = Date()   // evaluation and checkpoint time is not training time
            }
            if trainer.step % config.logEvery == 0 || m.accuracy != nil || isLast {
                let data = try JSONSerialization.data(withJSONObject: m.json, options: [.sortedKeys])
                metrics.write(data + Data("\n".utf8))
            }
            progress?(m, config.steps)
            last = m
        }
        if last == nil {
            let eval = try trainer.evaluateWithLoss(limit: config.testExamples)
            accuracy = eval.accuracy
            evalLoss = eval.loss
        }
        var summary: [String: Any] = ["accuracy": accuracy, "step": trainer.step, "test_examples": min(config.testExamples ?? trainer.test.count, trainer.test.count),
                                      "tokens_per_s": last?.tokensPerSecond ?? 0,
                                      "parameters": trainer.model.params.parameterCount,
                                      "wall_s": Date().timeIntervalSince(started)]
        summary["active_parameters"] = trainer.model.activeParameterCount
        summary["tokens_per_step"] = tokensPerStep
        if let loss = last?.loss, loss.isFinite { summary["final_loss"] = loss }
        if let evalLoss, evalLoss.isFinite {
            summary["eval_loss"] = evalLoss
            summary["perplexity"] = exp(evalLoss)
        }
        if writes {
            try atomicWrite(try JSONSerialization.data(withJSONObject: summary, options: [.sortedKeys, .prettyPrinted]),
                            to: out.appendingPathComponent("eval.json"))
        }
        return (accuracy, last)
    }
}

/// A run stopped by SIGINT or SIGTERM after writing its checkpoint.
public struct TrainingStopped: Error, CustomStringConvertible {
    public let signal: Int32, step: Int, out: URL
    /// 128 + the signal number, as a shell reports a process killed by it.
    public var exitCode: Int32 { 128 + signal }
    public var description: String {
        "stopped by \(StopSignal.name(signal)) after step \(step); the checkpoint is in \(out.path)/checkpoints"
    }
}

/// An underlying error's text on one line (YAML and JSON parsers point at the
/// offending column over several lines): errors here are one line each.
public func oneLine(_ text: String) -> String {
    text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }.joined(separator: " ")
}

func oneLine(_ error: Error) -> String { oneLine("\(error)") }

/// A plain scalar by YAML 1.2's core schema. Not Yams's resolvers: they follow
/// YAML 1.1, whose base-60 integers ("1:30:00") trap on overflow (a fuzzer
/// found "0:00:0:..." crashing the config reader).
func coreSchemaScalar(_ s: String) -> Any {
    switch s {
    case "", "~", "null", "Null", "NULL": return NSNull()
    case "true", "True", "TRUE": return true
    case "false", "False", "FALSE": return false
    case ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF": return Double.infinity
    case "-.inf", "-.Inf", "-.INF": return -Double.infinity
    case ".nan", ".NaN", ".NAN": return Double.nan
    default: break
    }
    let digits = s.drop { $0 == "+" || $0 == "-" }
    if s.count - digits.count <= 1, !digits.isEmpty, digits.allSatisfy(\.isASCII), digits.allSatisfy(\.isNumber) {
        return Int(s) ?? s   // beyond Int: kept as text, so the config check names the key
    }
    if s.hasPrefix("0o"), let v = Int(s.dropFirst(2), radix: 8) { return v }
    if s.hasPrefix("0x"), let v = Int(s.dropFirst(2), radix: 16) { return v }
    // [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
    if s.range(of: #"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"#, options: .regularExpression) != nil, let v = Double(s) {
        return v
    }
    return s
}

/// A YAML node as the JSON-like values the config merge works on: mappings with
/// string keys, sequences, and scalars resolved as YAML 1.2's core schema does
/// (null, bool, int, float, else string).
func plainYAML(_ node: Node, path: String, depth: Int = 0) throws -> Any {
    guard depth < 64 else { throw ModelError.badConfig("\(path) nests deeper than 64 levels") }
    switch node {
    case .scalar(let s):
        return s.style == .plain ? coreSchemaScalar(s.string) : s.string
    case .mapping(let m):
        var out: [String: Any] = [:]
        for (k, v) in m {
            guard case .scalar(let key) = k else { throw ModelError.badConfig("\(path): a mapping key is not a plain name") }
            out[key.string] = try plainYAML(v, path: path, depth: depth + 1)
        }
        return out
    case .sequence(let q):
        return try q.map { try plainYAML($0, path: path, depth: depth + 1) }
    default:
        throw ModelError.badConfig("\(path) holds a YAML node of an unsupported kind")
    }
}
