import Foundation
import MoECheckpoint
import MoECompute

/// Runs an experiment recipe: the pretrained starting points (cached), then for
/// each seed, budget and arm one fine-tuning run, one after another (so wall
/// times compare), each in `OUT/budget-P/ARM/seedS` with its own config.json,
/// metrics.jsonl, checkpoints and eval.json; then the transfer runs. A finished
/// run (eval.json) is skipped, an interrupted one resumes from its last
/// checkpoint. Writes `summary.json` and `results.md`.
public final class ExperimentRunner {
    public let recipe: ExperimentRecipe
    public let out: URL
    public let backend: Backend
    public var log: (String) -> Void = { print($0) }
    /// Marks the summary as a `--quick` run.
    public var quick = false
    let data: (train: ImageDataset, test: ImageDataset)
    private var starts: [String: ViT] = [:]
    /// The cache folder of each pretrained starting point, recorded in the runs that start from it.
    private var startFolders: [String: String] = [:]
    private var activeCache: [String: (active: Double, total: Int)] = [:]

    public init(recipe: ExperimentRecipe, out: URL, backend: Backend) throws {
        self.recipe = recipe; self.out = out; self.backend = backend
        var d = try BuiltinData.load(recipe.data ?? BuiltinData.fashionMNISTFolder)
        if let n = recipe.trainExamples { d.train = try d.train.prefix(n) }
        data = d
    }

    // MARK: configs

    /// The fine-tuning config every run starts from: the default recipe at the target width.
    func baseConfig() -> TrainConfig {
        var c = Recipe.defaultFineTune()
        c.model.width = recipe.width
        c.model.moeBlocks = []; c.model.moe = nil
        c.data = recipe.data
        c.trainExamples = recipe.trainExamples
        c.testExamples = recipe.testExamples
        c.batchSize = recipe.batchSize
        c.learningRate = recipe.learningRate
        c.warmupSteps = recipe.warmupSteps
        c.seed = recipe.pretrainSeed
        return c
    }

    func arm(_ name: String) -> ExperimentArm { recipe.arms.first { $0.name == name }! }

    public func modelConfig(_ arm: ExperimentArm) -> ViTConfig {
        var m = baseConfig().model
        guard arm.router != "dense" else { return m }
        m.moeBlocks = recipe.moeBlocks
        var moe = Recipe.moe(router: arm.router, experts: arm.experts)
        if let k = arm.topK { moe.topK = k }
        Recipe.shapeExperts(&moe, for: arm.upcycle, granularity: arm.granularity, topK: arm.topK)
        m.moe = moe
        return m
    }

    /// Active (per-token) and total parameters of an arm's model.
    func sizes(_ arm: ExperimentArm) throws -> (active: Double, total: Int) {
        if let s = activeCache[arm.name] { return s }
        let m = try ViT(config: modelConfig(arm), backend: CPUBackend(), seed: 0, training: false)
        let s = (m.activeParameterCount, m.params.parameterCount)
        activeCache[arm.name] = s
        return s
    }

    public func budgetSteps(_ budget: Double) -> Int { max(1, Int((budget * Double(recipe.pretrainSteps)).rounded())) }

    /// The arm's steps at a budget: the budget's, or for an equal-FLOPs arm the
    /// steps whose training FLOPs match its reference arm's.
    public func steps(_ arm: ExperimentArm, budget: Double) throws -> Int {
        let base = budgetSteps(budget)
        guard let ref = arm.equalFlopsTo else { return base }
        return Int((Double(base) * (try sizes(self.arm(ref)).active) / (try sizes(arm).active)).rounded())
    }

    public func trainConfig(_ arm: ExperimentArm, budget: Double, seed: UInt64) throws -> TrainConfig {
        var c = baseConfig()
        c.model = modelConfig(arm)
        c.steps = try steps(arm, budget: budget)
        c.seed = seed
        c.evalEvery = max(1, c.steps / max(recipe.evalPoints, 1))
        return c
    }

    public func runDirectory(_ arm: String, budget: Double, seed: UInt64) -> URL {
        out.appendingPathComponent(String(format: "budget-%g", 100 * budget)).appendingPathComponent(arm).appendingPathComponent("seed\(seed)")
    }

    public func transferDirectory(_ arm: String, seed: UInt64) -> URL {
        out.appendingPathComponent("transfer-\(recipe.transfer!.name)").appendingPathComponent(arm).appendingPathComponent("seed\(seed)")
    }

    // MARK: starting points

    public struct Pretrained: Codable, Sendable {
        public var name: String
        public var width: Int
        public var steps: Int
        public var parameters: Int
        public var trainingFLOPs: Double
        public var wallSeconds: Double?
        public var accuracy: Double
        public var directory: String
    }

    func pretrained(width: Int, name: String, learningRate: Float? = nil) throws -> (ViT, Pretrained) {
        var c = baseConfig()
        c.model.width = width
        let (model, accuracy) = try Recipe.pretrainedDense(for: c, steps: recipe.pretrainSteps, learningRate: learningRate,
                                                           backend: backend, data: data, log: log)
        let dir = try Recipe.pretrainedDenseDirectory(for: c, steps: recipe.pretrainSteps, learningRate: learningRate)
        startFolders[name] = dir.lastPathComponent
        let eval = (try? Data(contentsOf: dir.appendingPathComponent("eval.json"))).flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }
        let tokens = Double(c.batchSize * model.tokensPerExample)
        let info = Pretrained(name: name, width: width, steps: recipe.pretrainSteps, parameters: model.params.parameterCount,
                              trainingFLOPs: 6 * model.activeParameterCount * tokens * Double(recipe.pretrainSteps),
                              wallSeconds: (eval?["wall_s"] as? NSNumber)?.doubleValue, accuracy: accuracy, directory: dir.path)
        return (model, info)
    }

    // MARK: running

    /// Runs everything not yet finished; returns the summary (also written to disk).
    @discardableResult
    public func run() throws -> ExperimentSummary {
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        try atomicWrite(try JSONEncoder.sorted.encode(recipe), to: out.appendingPathComponent("recipe.json"))
        var pretrainedInfo: [Pretrained] = []
        let (dense, denseInfo) = try pretrained(width: recipe.width, name: "dense")
        starts["dense"] = dense; pretrainedInfo.append(denseInfo)
        if recipe.arms.contains(where: { $0.start == "predecessor" }) {
            let (wide, wideInfo) = try pretrained(width: recipe.predecessorWidth, name: "predecessor", learningRate: recipe.predecessorLearningRate)
            starts["predecessor"] = wide; pretrainedInfo.append(wideInfo)
        }
        var results: [ExperimentRunResult] = [], transfers: [ExperimentRunResult] = []
        let transferData = try recipe.transfer.map { try BuiltinData.load(ExperimentRunnerPaths.expand($0.data)) }
        let total = recipe.seeds.count * recipe.budgets.count * recipe.arms.count
        var n = 0
        for seed in recipe.seeds {
            for budget in recipe.budgets {
                for arm in recipe.arms {
                    n += 1
                    results.append(try execute(arm, budget: budget, seed: seed, index: n, of: total))
                }
            }
            if let t = recipe.transfer, let td = transferData {
                for arm in recipe.arms { transfers.append(try executeTransfer(arm, task: t, data: td, seed: seed)) }
            }
        }
        let summary = try ExperimentSummary(recipe: recipe, runner: self, pretrained: pretrainedInfo, runs: results, transfers: transfers)
        try atomicWrite(try JSONEncoder.sorted.encode(summary), to: out.appendingPathComponent("summary.json"))
        try atomicWrite(Data(summary.markdown().utf8), to: out.appendingPathComponent("results.md"))
        return summary
    }

    /// The finished result in `dir`, when its eval.json is there and its config is `c`.
    func finished(_ dir: URL, config c: TrainConfig, arm: String, budget: Double, seed: UInt64) throws -> ExperimentRunResult? {
        let cfgURL = dir.appendingPathComponent("config.json")
        guard FileManager.default.fileExists(atPath: cfgURL.path) else { return nil }
        let stored = try TrainRun.storedConfig(dir)
        guard try JSONEncoder.sorted.encode(stored) == JSONEncoder.sorted.encode(c) else {
            throw ModelError.badConfig("\(dir.path) holds a run with another config (the recipe changed since it ran): remove the folder or use another --out")
        }
        guard FileManager.default.fileExists(atPath: dir.appendingPathComponent("eval.json").path) else { return nil }
        return try Self.readResult(dir, arm: arm, budget: budget, seed: seed)
    }

    func execute(_ arm: ExperimentArm, budget: Double, seed: UInt64, index: Int, of total: Int) throws -> ExperimentRunResult {
        let c = try trainConfig(arm, budget: budget, seed: seed)
        let dir = runDirectory(arm.name, budget: budget, seed: seed)
        let tag = String(format: "[%d/%d] %@ budget %g%% seed %llu", index, total, arm.name, 100 * budget, seed)
        // Which pretrained checkpoint the run starts from: a run from another one is not this run.
        let start = arm.start == "scratch" ? "scratch" : "\(arm.start) \(startFolders[arm.start] ?? "?")"
        let marker = dir.appendingPathComponent("start.txt")
        if let recorded = try? String(contentsOf: marker, encoding: .utf8), recorded != start {
            throw ModelError.badConfig("\(dir.path) started from \(recorded), this recipe starts it from \(start): remove the folder or use another --out")
        }
        if let done = try finished(dir, config: c, arm: arm.name, budget: budget, seed: seed) {
            log(String(format: "%@: done before (top-1 %.2f%%), skipped", tag, 100 * done.accuracy))
            return done
        }
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try atomicWrite(Data(start.utf8), to: marker)
        return try train(c, dir: dir, tag: tag, arm: arm.name, budget: budget, seed: seed) { model in
            let method = arm.upcycle.flatMap(ExpertInit.init(rawValue:))
            guard arm.start != "scratch", let source = self.starts[arm.start] else { return [] }
            let calibration = method == .recycle || source.config.width != model.config.width
                ? try Recipe.calibrationPatches(self.data.train, model: model.config, count: 256, backend: self.backend) : nil
            return try OnlineUpcycle.apply(dense: source, into: model, method: method, calibration: calibration, seed: seed)
        }
    }

    /// The arm's model fine-tuned at the transfer budget, with a new head, trained on the transfer data.
    func executeTransfer(_ arm: ExperimentArm, task t: ExperimentRecipe.TransferTask, data td: (train: ImageDataset, test: ImageDataset),
                         seed: UInt64) throws -> ExperimentRunResult {
        var c = try trainConfig(arm, budget: t.budget, seed: seed)
        c.model.classes = td.train.classes
        c.data = ExperimentRunnerPaths.expand(t.data)
        c.trainExamples = nil; c.testExamples = nil
        c.steps = t.steps
        c.learningRate = t.learningRate
        c.evalEvery = max(1, t.steps / max(recipe.evalPoints, 1))
        let dir = transferDirectory(arm.name, seed: seed)
        let tag = "transfer \(t.name): \(arm.name) seed \(seed)"
        if let done = try finished(dir, config: c, arm: arm.name, budget: t.budget, seed: seed) {
            log(String(format: "%@: done before (top-1 %.2f%%), skipped", tag, 100 * done.accuracy))
            return done
        }
        let source = runDirectory(arm.name, budget: t.budget, seed: seed).appendingPathComponent("model.safetensors")
        return try train(c, dir: dir, tag: tag, arm: arm.name, budget: t.budget, seed: seed, data: td) { model in
            // Every tensor but the head (a new one, from the seed).
            let file = try ModelCheckpoint.open(source.path)
            var copied = 0
            for tensor in model.checkpointTensors where !tensor.name.hasPrefix("head.") {
                guard let e = file.descriptor(tensor.name), e.count == tensor.count else {
                    throw ModelError.badInput("\(source.path) lacks \(tensor.name) \(tensor.shape)")
                }
                try tensor.value().write(try file.floats(tensor.name))
                copied += 1
            }
            return ["\(copied) tensors from \(source.path), a new \(c.model.classes)-class head"]
        }
    }

    func train(_ c: TrainConfig, dir: URL, tag: String, arm: String, budget: Double, seed: UInt64,
               data override: (train: ImageDataset, test: ImageDataset)? = nil,
               initialize: (ViT) throws -> [String]) throws -> ExperimentRunResult {
        let model = try ViT(config: c.model, backend: backend, seed: c.seed)
        let fm = FileManager.default
        let resumable = TrainRun.latestCheckpoint(dir) != nil
        let run = try TrainRun(config: c, model: model, out: dir, data: override ?? data)
        if resumable {
            try run.resume(from: dir)
            log("\(tag): resuming at step \(run.trainer.step) of \(c.steps)")
        } else {
            try? fm.removeItem(at: dir.appendingPathComponent("metrics.jsonl"))
            for line in try initialize(model) { log("\(tag): \(line)") }
            log("\(tag): \(c.steps) steps, \(model.params.parameterCount) parameters -> \(dir.path)")
        }
        var lastPrint = Date()
        run.progress = { m, total in
            if let acc = m.accuracy, m.step == total || Date().timeIntervalSince(lastPrint) > 30 {
                self.log(String(format: "%@: step %d/%d  loss %.4f  top-1 %.2f%%  %.0f tok/s", tag, m.step, total, m.loss, 100 * acc, m.tokensPerSecond))
                lastPrint = Date()
            }
        }
        try run.run()
        return try Self.readResult(dir, arm: arm, budget: budget, seed: seed)
    }

    static func readResult(_ dir: URL, arm: String, budget: Double, seed: UInt64) throws -> ExperimentRunResult {
        guard let e = (try? Data(contentsOf: dir.appendingPathComponent("eval.json"))).flatMap({ try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }),
              let acc = (e["accuracy"] as? NSNumber)?.doubleValue, let step = (e["step"] as? NSNumber)?.intValue else {
            throw ModelError.badInput("\(dir.path)/eval.json is missing or unreadable: rerun the experiment to finish this run")
        }
        var curve: [[Double]] = []
        var imbalance: [Double] = []
        let text = (try? String(contentsOf: dir.appendingPathComponent("metrics.jsonl"), encoding: .utf8)) ?? ""
        for line in text.split(separator: "\n") {
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let s = (o["step"] as? NSNumber)?.doubleValue else { continue }
            if let a = (o["accuracy"] as? NSNumber)?.doubleValue { curve.append([s, a]) }
            if let loads = o["expert_load"] as? [String: [NSNumber]] {
                for counts in loads.values {
                    let v = counts.map(\.doubleValue), mean = v.reduce(0, +) / Double(max(v.count, 1))
                    if mean > 0 { imbalance.append(v.max()! / mean) }
                }
            }
        }
        return ExperimentRunResult(arm: arm, budget: budget, seed: seed, steps: step, accuracy: acc, curve: curve,
                                   activeParameters: (e["active_parameters"] as? NSNumber)?.doubleValue ?? 0,
                                   parameters: (e["parameters"] as? NSNumber)?.intValue ?? 0,
                                   tokensPerStep: (e["tokens_per_step"] as? NSNumber)?.doubleValue ?? 0,
                                   wallSeconds: (e["wall_s"] as? NSNumber)?.doubleValue ?? 0,
                                   loadImbalance: imbalance.isEmpty ? nil : imbalance.reduce(0, +) / Double(imbalance.count))
    }
}

/// Paths in experiment recipes.
public enum ExperimentRunnerPaths {
    /// `data:NAME` is NAME in the data cache the fetch scripts fill ($MOE_GPU_DATA, else
    /// $XDG_CACHE_HOME/moe-gpu/data, else ~/.cache/moe-gpu/data); `~` and `$HOME` expand.
    public static func expand(_ path: String) -> String {
        let env = ProcessInfo.processInfo.environment
        let home = env["HOME"] ?? NSHomeDirectory()
        if path.hasPrefix("data:") {
            let cache = env["MOE_GPU_DATA"].flatMap { $0.isEmpty ? nil : $0 }
                ?? (env["XDG_CACHE_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? home + "/.cache") + "/moe-gpu/data"
            return cache + "/" + path.dropFirst(5)
        }
        if path.hasPrefix("~/") { return home + path.dropFirst(1) }
        return path.replacingOccurrences(of: "$HOME", with: home)
    }
}
