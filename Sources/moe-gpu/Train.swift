import ArgumentParser
import Foundation
import MoECompute
import MoEModel

/// `moe-gpu train`: with no arguments, the MoE Jetpack recipe on Fashion-MNIST
/// (pretrain a small dense ViT or reuse the cached one, recycle it into a
/// SpheroMoE model, fine-tune); with flags or a config file, any recipe.
struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Upcycle a dense model into an MoE and fine-tune it (default: the MoE Jetpack recipe on Fashion-MNIST; --task lm: Llama 3 Meets MoE on Shakespeare).",
        discussion: """
            With no arguments: pretrain a small dense ViT on Fashion-MNIST (or reuse the one cached from an \
            earlier run), recycle it into a SpheroMoE model (importance-sampled experts, cosine routing) and \
            fine-tune it, printing the dense baseline beside the result. Outputs go to --out: config.json, \
            metrics.jsonl, checkpoints/step-N/ (model + optimizer, one unit), model.safetensors (the latest model), eval.json.

            With --task lm: pretrain a small byte-level Llama on Shakespeare (or reuse the cached one), upcycle it \
            online into 8 experts top-2 in every layer, train it and the dense model for the same extra steps, and print \
            both validation losses and perplexities. --init takes a Llama GGUF, a Hugging Face Llama or Mixtral folder \
            or a moe-gpu checkpoint; --upcycle replicate|granular|recycle builds the experts at load time.
            """)

    @Option(name: .long, help: "A JSON or YAML training config (see `moe-gpu train --print-config`).")
    var config: String?
    @Option(name: .long, help: "Where the model starts: scratch, dense (pretrain or reuse the cached dense ViT), or a checkpoint file.")
    var `init`: String?
    @Option(name: .long, help: "How experts come from the dense model: replicate, granular, recycle or none. A dense --init wider than the model is narrowed first (MoE Jetpack).")
    var upcycle: String?
    @Option(name: .long, help: "Router of the MoE layers: dense (no MoE), topk, expert-choice, soft or sphero.")
    var router: String?
    @Option(name: .long, help: "Device: auto, cpu, opencl, opencl:P:D (or MOE_GPU_DEVICE).")
    var device: String?
    @Option(name: .long, help: "Optimiser steps of the (fine-)tuning run.")
    var steps: Int?
    @Option(name: .long, help: "Output folder.")
    var out: String?
    @Option(name: .long, help: "Resume the run in this output folder.")
    var resume: String?
    @Option(name: .customLong("gradient-accumulation"), help: "Micro-batches of --batch-size per step, over all ranks under mpirun (the global batch is their product).")
    var gradientAccumulation: Int?
    @Option(name: .customLong("expert-parallel"), help: "Under mpirun: split every MoE layer's experts over groups of this many ranks (it divides the number of ranks and the experts).")
    var expertParallel: Int = 1
    @Option(name: .customLong("zero-stage"), help: "Under mpirun: 1 splits AdamW's moments over the ranks (ZeRO stage 1: each rank updates its share of the parameters and broadcasts it); 0 keeps them on every rank.")
    var zeroStage: Int?
    @Option(name: .customLong("comm-timeout"), help: "Under mpirun: seconds a collective may wait for the other ranks before this rank stops with an error.")
    var commTimeout: Double = 300
    @Option(name: .customLong("skip-nonfinite"), help: "Skip up to N steps whose loss or gradient is NaN or infinite (the step counts, the update does not) instead of stopping.")
    var skipNonFinite: Int?
    @Flag(name: .long, help: "Replace the run an explicit --out already holds (otherwise that is an error; without --out a new runs/NAME-N folder is used).")
    var overwrite = false
    @Option(name: .long, help: "Folder of MNIST-format IDX files, or a CSV image table (.csv[.gz], label last) (default Fashion-MNIST).")
    var data: String?
    @Option(name: .long, help: "Peak learning rate.")
    var lr: Float?
    @Option(name: .long, help: "Batch size.")
    var batchSize: Int?
    @Option(name: .long, help: "Experts per MoE layer.")
    var experts: Int?
    @Option(name: .long, help: "k for top-k routing.")
    var topK: Int?
    @Option(name: .long, help: "Pretraining steps of the dense model (with --init dense).")
    var denseSteps: Int?
    @Option(name: .long, help: "Random seed.")
    var seed: UInt64?
    @Option(name: .long, help: "ViT residual width of the trained model (a wider --init is recycled into it).")
    var width: Int?
    @Flag(name: .long, help: "With --init dense, skip training the dense model for the same steps as a baseline.")
    var noBaseline = false
    @Option(name: .long, help: "image (a ViT on images, the default) or lm (a Llama-style decoder on text).")
    var task: String?
    @Option(name: .long, help: "Language models: tokens per training window.")
    var seqLen: Int?
    @Option(name: .long, help: "Language models: which parameters train: all, experts, or experts,router (the rest frozen).")
    var train: String?
    @Option(name: .long, help: "With --upcycle granular: shards per copy of the dense MLP (default 2; ViT experts are MLP width / G wide).")
    var granularity: Int?
    @Flag(name: .long, help: "Language models, with --init dense: also continue the dense model for the MoE run's training FLOPs (more steps).")
    var equalFlops = false
    @Option(name: .long, help: "Language models: validation text (default: the corpus's validation plays, or the last 5% of --data).")
    var evalData: String?
    @Flag(name: .long, help: "Print the resolved config as JSON and exit.")
    var printConfig = false

    func run() throws {
        // Ctrl-C / SIGTERM: finish the step, write a checkpoint, say how to resume.
        StopSignal.install()
        try validateOptions()
        // Under mpirun / srun: join the job; rank 0 alone prints and writes.
        _ = try Distributed.start(timeout: commTimeout)
        try Distributed.startExpertParallel(expertParallel)
        // MPI_Finalize after success only: a rank that fails alone exits without
        // it (finalize would wait for ranks still in a collective), and mpirun
        // then ends the others.
        do { try runTraining() } catch let stop as TrainingStopped {
            print("\(stop.description)\nresume with: moe-gpu train --resume \(stop.out.path)")
            throw ExitCode(stop.exitCode)
        }
        Distributed.finish()
    }

    func runTraining() throws {
        // Progress lines should reach a pipe or a log file as they happen.
        setvbuf(stdout, nil, _IOLBF, 0)
        let backend = try DeviceCatalog().makeBackend(try DeviceSelector.resolve(device))
        let world = Distributed.world
        if world.size > 1 {
            print("data parallel: \(world.summary), device \(backend.name)")
            if world.rank != 0 { _ = freopen("/dev/null", "w", stdout) }
        }
        if let resume {
            let dir = URL(fileURLWithPath: resume)
            var cfg = try TrainRun.storedConfig(dir)
            // How the state is split over the ranks is not part of the checkpoint: it may change on resume.
            if let zeroStage { cfg.zeroStage = zeroStage }
            if cfg.task == "lm" { return try resumeLanguageModel(cfg, dir: dir, backend: backend) }
            if let steps { cfg.steps = steps }
            let model = try ViT(config: cfg.model, backend: backend, seed: cfg.seed)
            let run = try TrainRun(config: cfg, model: model, out: dir, data: try loadData(cfg))
            try run.resume(from: dir)
            print("resuming \(dir.path) at step \(run.trainer.step) of \(cfg.steps) on \(backend.name)")
            try finish(run, label: "resumed")
            return
        }

        let fileConfig = try config.map(TrainRun.loadConfig)
        if task == "lm" || fileConfig?.task == "lm" { return try runLanguageModel(fileConfig, backend: backend) }
        guard task == nil || task == "image" else { throw CommandError("unknown --task '\(task!)': use image or lm") }
        var cfg = fileConfig ?? Recipe.defaultFineTune()
        apply(to: &cfg)
        let start = config == nil ? "dense" : "scratch"
        let initFrom = self.`init` ?? start
        let method = upcycle ?? (initFrom == "scratch" ? "none" : "recycle")
        if printConfig {
            print(String(decoding: try JSONEncoder.pretty.encode(cfg), as: UTF8.self))
            return
        }
        try cfg.validate()
        guard ["replicate", "granular", "recycle", "none"].contains(method) else {
            throw CommandError("unknown --upcycle '\(method)': use replicate, granular, recycle or none")
        }
        let outDir = try TrainRun.freshOutput(explicit: out, base: "runs/\(cfg.model.moeBlocks.isEmpty ? "dense" : cfg.model.moe!.router)", overwrite: overwrite)
        let data = try loadData(cfg)
        print("device \(backend.name): \(backend.deviceDescription)")
        print("data: \(data.train.count) train / \(data.test.count) test images of \(data.train.height)x\(data.train.width), \(data.train.classes) classes")

        let model = try ViT(config: cfg.model, backend: backend, seed: cfg.seed)
        var baseline: Double?
        var denseModel: ViT?
        switch initFrom {
        case "scratch":
            break
        case "dense":
            let (dense, accuracy) = try Recipe.pretrainedDense(for: cfg, steps: denseSteps, backend: backend, data: data)
            baseline = accuracy
            denseModel = dense
            try upcycleInto(model, from: dense, method: method, cfg: cfg, data: data)
        default:
            let denseConfig = try ModelCheckpoint.config(at: initFrom)
            let dense = try ViT(config: denseConfig, backend: backend, seed: cfg.seed)
            try ModelCheckpoint.load(initFrom, into: dense)
            print("loaded \(initFrom)")
            try upcycleInto(model, from: dense, method: method, cfg: cfg, data: data)
        }
        let run = try TrainRun(config: cfg, model: model, out: outDir, data: data)
        let moe = cfg.model.moe.map { " with \($0.router) MoE in blocks \(cfg.model.moeBlocks)" } ?? ""
        print("training \(model.params.parameterCount) parameters\(cfg.model.moeBlocks.isEmpty ? "" : moe) for \(cfg.steps) steps -> \(outDir.path)")
        let accuracy = try finish(run, label: cfg.model.moeBlocks.isEmpty ? "dense" : cfg.model.moe!.router)
        if let baseline, let dense = denseModel, !noBaseline, !cfg.model.moeBlocks.isEmpty {
            // The fair comparison: the same dense model trained for the same extra steps.
            var denseCfg = cfg
            denseCfg.model = dense.config
            let continued = try TrainRun(config: denseCfg, model: dense, out: outDir.appendingPathComponent("dense-continued"), data: data)
            print("dense baseline: continuing the dense ViT for the same \(cfg.steps) steps -> \(continued.out.path)")
            let denseAccuracy = try finish(continued, label: "dense")
            print(String(format: "pretrained dense %.2f%%; after %d more steps: dense %.2f%%, upcycled %@ %.2f%% (%+.2f points)",
                         100 * baseline, cfg.steps, 100 * denseAccuracy, cfg.model.moe!.router, 100 * accuracy, 100 * (accuracy - denseAccuracy)))
        }
    }

    /// The flags every task shares.
    func applyShared(to cfg: inout TrainConfig) {
        if let steps { cfg.steps = steps }
        if let data { cfg.data = data }
        if let lr { cfg.learningRate = lr }
        if let batchSize { cfg.batchSize = batchSize }
        if let seed { cfg.seed = seed }
        if let skipNonFinite { cfg.skipNonFinite = skipNonFinite }
        if let gradientAccumulation { cfg.gradientAccumulation = gradientAccumulation }
        if let zeroStage { cfg.zeroStage = zeroStage }
    }

    func apply(to cfg: inout TrainConfig) {
        applyShared(to: &cfg)
        if let router {
            if router == "dense" { cfg.model.moeBlocks = []; cfg.model.moe = nil } else {
                var moe = cfg.model.moe ?? MoEConfig()
                if moe.router != router { moe = Recipe.moe(router: router) }
                cfg.model.moe = moe
                if cfg.model.moeBlocks.isEmpty { cfg.model.moeBlocks = Array((cfg.model.depth / 2)..<cfg.model.depth) }
            }
        }
        if let width { cfg.model.width = width }
        if let experts { cfg.model.moe?.experts = experts }
        if let topK { cfg.model.moe?.topK = topK }
        if cfg.model.moe != nil { Recipe.shapeExperts(&cfg.model.moe!, for: upcycle, granularity: granularity, topK: topK) }
    }

    /// Option values no config check sees.
    func validateOptions() throws {
        if let granularity, granularity < 1 { throw CommandError("--granularity \(granularity) must be at least 1") }
        if let denseSteps, denseSteps < 1 { throw CommandError("--dense-steps \(denseSteps) must be at least 1") }
    }

    func upcycleInto(_ model: ViT, from dense: ViT, method: String, cfg: TrainConfig, data: (train: ImageDataset, test: ImageDataset)) throws {
        guard let expertInit = ExpertInit(rawValue: method) else {
            // --upcycle none: copy what the models share and keep fresh experts.
            try OnlineUpcycle.apply(dense: dense, into: model, method: nil, calibration: nil, seed: cfg.seed)
            return
        }
        let calibration = try Recipe.calibrationPatches(data.train, model: cfg.model, count: 256, backend: model.backend)
        for line in try OnlineUpcycle.apply(dense: dense, into: model, method: expertInit, calibration: calibration, seed: cfg.seed) {
            print("upcycle: \(line)")
        }
    }

    @discardableResult
    func finish(_ run: TrainRun, label: String) throws -> Double {
        let bar = ProgressLine(label: label)
        run.progress = { m, total in bar.update(m, total: total) }
        let (accuracy, last) = try run.run()
        bar.done()
        print(String(format: "%@: step %d, loss %.4f, test accuracy %.2f%% (%d images), %.0f tokens/s; outputs in %@",
                     label, run.trainer.step, last?.loss ?? .nan, 100 * accuracy, min(run.config.testExamples ?? run.trainer.test.count, run.trainer.test.count),
                     last?.tokensPerSecond ?? 0, run.out.path))
        return accuracy
    }

    func loadData(_ cfg: TrainConfig) throws -> (train: ImageDataset, test: ImageDataset) {
        var d = try BuiltinData.load(cfg.data ?? BuiltinData.fashionMNISTFolder)
        if let n = cfg.trainExamples { d.train = try d.train.prefix(n) }
        return d
    }
}

/// A live progress line: step, loss, accuracy, tokens/s, ETA.
final class ProgressLine {
    let label: String
    let start = Date()
    /// A terminal gets a live line; not under mpirun (Open MPI hands ranks a
    /// pseudo-terminal, and its collected output is a log).
    lazy var tty = isatty(STDOUT_FILENO) != 0 && Distributed.world.size == 1
    /// Under mpirun lines are written by another thread: after Ctrl-C mpirun
    /// stops reading the ranks' output while it sends SIGTERM and waits, and a
    /// rank blocked in a write would not finish its step and checkpoint before
    /// mpirun's SIGKILL. The training thread never waits for the terminal.
    lazy var writer: DispatchQueue? = Distributed.world.size > 1 ? DispatchQueue(label: "moe-gpu.progress") : nil

    private func emit(_ text: String) {
        guard let writer else { return print(text) }
        writer.async { print(text); fflush(stdout) }
    }
    var lastPrinted = Date.distantPast
    init(label: String) { self.label = label }

    func update(_ m: StepMetrics, total: Int) {
        let elapsed = Date().timeIntervalSince(start)
        let eta = elapsed / Double(max(m.step, 1)) * Double(max(total - m.step, 0))
        var line = String(format: "%@ step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  ETA %@", label, m.step, total, m.loss,
                          m.learningRate, m.tokensPerSecond, formatDuration(eta))
        if let acc = m.accuracy { line += String(format: "  test acc %.2f%%", 100 * acc) }
        if let loss = m.evalLoss { line += String(format: "  val loss %.4f", loss) }
        if tty {
            print("\r\u{1B}[K" + line, terminator: m.accuracy != nil ? "\n" : "")
            fflush(stdout)
        } else if m.accuracy != nil || Date().timeIntervalSince(lastPrinted) > 10 || m.step == total {
            emit(line)
            lastPrinted = Date()
        }
    }

    func done() {
        writer?.sync {}   // the last lines out before the summary
        if tty { print("") }
    }
}

func formatDuration(_ s: Double) -> String {
    let t = Int(s.rounded())
    return t >= 60 ? "\(t / 60)m\(String(format: "%02d", t % 60))s" : "\(t)s"
}

extension JSONEncoder {
    static var pretty: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .prettyPrinted]
        return e
    }
}
