import ArgumentParser
import Foundation
import MoECheckpoint
import MoECompute
import MoEModel

/// `moe-gpu train --task lm`: decoder language models on the one trainer.
/// With no other arguments: pretrain a small byte-level Llama on Shakespeare (or
/// reuse the cached one), upcycle it online into 8 experts top-2 in every layer,
/// train both it and the dense model for the same extra steps, print both
/// validation losses. With `--init FILE|DIR`: a GGUF or Hugging Face Llama (or a
/// Mixtral / moe-gpu checkpoint), upcycled at load time with `--upcycle`.
extension Train {
    func runLanguageModel(_ fileConfig: TrainConfig?, backend: Backend) throws {
        var cfg = fileConfig ?? LMRecipe.defaultFineTune()
        cfg.task = "lm"
        if cfg.lm == nil { cfg.lm = LMRecipe.denseModel() }
        applyLM(to: &cfg)
        let initFrom = self.`init` ?? (fileConfig == nil ? "dense" : "scratch")
        let method = try upcycleMethod(initFrom: initFrom)
        let trainable = try trainablePredicate()

        // The model the run trains: the source checkpoint's shape, made MoE by --upcycle.
        var source: TensorSource?
        if !["dense", "scratch"].contains(initFrom) {
            let (s, stored) = try LlamaCheckpoint.open(initFrom)
            source = s
            var lm = stored
            if let method {
                guard stored.moeLayers.isEmpty else {
                    throw CommandError("\(initFrom) is already an MoE model: drop --upcycle to continue training it")
                }
                var moe = LMRecipe.mixtralMoE(experts: experts ?? 8, topK: topK ?? 2)
                let g = granularity ?? 1
                switch method {
                case .replicate: moe.expertWidthRatio = 1
                case .granular: moe.expertWidthRatio = 1 / Double(g)
                case .recycle: moe.expertWidthRatio = 0.5
                }
                if let r = router, r != "topk" { moe = try routerSettings(r, base: moe) }
                lm.moe = moe
                lm.moeLayers = Array(0..<lm.layers)
            }
            cfg.lm = lm
            if seqLen == nil { cfg.seqLen = min(cfg.seqLen, lm.maxPositions) }
        } else if initFrom == "dense", let method, method != .replicate, cfg.lm?.moe != nil {
            cfg.lm!.moe!.expertWidthRatio = method == .granular ? 1 / Double(granularity ?? 1) : 0.5
        }
        if printConfig {
            print(String(decoding: try JSONEncoder.pretty.encode(cfg), as: UTF8.self))
            return
        }
        try cfg.validate()
        let lm = cfg.lm!
        let label = lm.moeLayers.isEmpty ? "dense" : "moe"
        let outDir = try TrainRun.freshOutput(explicit: out, base: "runs/lm-\(label)", overwrite: overwrite)
        print("device \(backend.name): \(backend.deviceDescription)")
        let data = try LMRecipe.sources(train: cfg.data, validation: cfg.evalData, tokenizer: lm.tokenizer, seqLen: cfg.seqLen)

        var denseFile: String?, denseLoss: Double?
        switch initFrom {
        case "scratch": break
        case "dense":
            let (file, loss) = try LMRecipe.pretrainedDense(for: cfg, steps: denseSteps, backend: backend, data: data)
            denseFile = file; denseLoss = loss
            source = try openCheckpoint(path: file)
        default: break
        }
        let model = try LlamaModel(config: lm, backend: backend, seed: cfg.seed, sequenceLength: cfg.seqLen, trainable: trainable,
                                   initialize: source == nil)
        if let source {
            var options = LMUpcycleOptions(method: method ?? .replicate, granularity: granularity ?? 1, seed: cfg.seed)
            if method == .recycle {
                // MoE Jetpack: importance from the hidden states of the first 64 training windows.
                var dense = lm
                dense.moe = nil; dense.moeLayers = []
                options.importance = try LMRecipe.neuronImportance(source: source, dense: dense, windows: data.train, count: 64, backend: backend)
            }
            for line in try LlamaCheckpoint.load(source, into: model, upcycle: method == nil ? nil : options) { print("upcycle: \(line)") }
            print("loaded \(denseFile ?? initFrom)")
        }
        source = nil   // the dense weights are not needed any more
        let trainer = try Trainer(config: cfg, model: model, train: data.train, test: data.test)
        let run = try TrainRun(config: cfg, trainer: trainer, out: outDir)
        let frozen = model.params.all.filter { !$0.trainable }.reduce(0) { $0 + $1.count }
        print("training \(model.params.parameterCount) parameters\(frozen > 0 ? " (\(frozen) frozen)" : "")\(lm.moeLayers.isEmpty ? "" : ", \(lm.moe!.experts) experts top-\(lm.moe!.topK) in \(lm.moeLayers.count) layers") for \(cfg.steps) steps of \(cfg.batchSize) x \(cfg.seqLen) tokens -> \(outDir.path)")
        let loss = try finishLM(run, label: label)

        if let denseFile, let denseLoss, !noBaseline, !lm.moeLayers.isEmpty {
            // The fair comparison: the same dense model trained for the same extra steps.
            var denseCfg = cfg
            denseCfg.lm?.moe = nil; denseCfg.lm?.moeLayers = []
            let dense = try LlamaModel(config: denseCfg.lm!, backend: backend, seed: cfg.seed, sequenceLength: cfg.seqLen, initialize: false)
            try LlamaCheckpoint.load(try openCheckpoint(path: denseFile), into: dense)
            let continued = try TrainRun(config: denseCfg, trainer: try Trainer(config: denseCfg, model: dense, train: data.train, test: data.test),
                                         out: outDir.appendingPathComponent("dense-continued"))
            print("dense baseline: continuing the dense Llama for the same \(cfg.steps) steps -> \(continued.out.path)")
            let continuedLoss = try finishLM(continued, label: "dense")
            print(String(format: "pretrained dense: validation loss %.4f (perplexity %.2f); after %d more steps: dense %.4f (%.2f), upcycled %d x top-%d %.4f (%.2f)",
                         denseLoss, exp(denseLoss), cfg.steps, continuedLoss, exp(continuedLoss), lm.moe!.experts, lm.moe!.topK, loss, exp(loss)))
            if equalFlops {
                // The same extra training FLOPs: the dense model gets more steps, by the ratio of active parameters.
                let ratio = model.activeParameterCount / dense.activeParameterCount
                var flopsCfg = denseCfg
                flopsCfg.steps = Int((Double(cfg.steps) * ratio).rounded())
                let fresh = try LlamaModel(config: denseCfg.lm!, backend: backend, seed: cfg.seed, sequenceLength: cfg.seqLen, initialize: false)
                try LlamaCheckpoint.load(try openCheckpoint(path: denseFile), into: fresh)
                let run = try TrainRun(config: flopsCfg, trainer: try Trainer(config: flopsCfg, model: fresh, train: data.train, test: data.test),
                                       out: outDir.appendingPathComponent("dense-equal-flops"))
                print(String(format: "dense baseline at equal FLOPs: %d steps (%.2fx the MoE's active parameters per token) -> %@",
                             flopsCfg.steps, ratio, run.out.path))
                let flopsLoss = try finishLM(run, label: "dense-flops")
                print(String(format: "at equal training FLOPs: dense %.4f (%.2f), upcycled %.4f (%.2f)", flopsLoss, exp(flopsLoss), loss, exp(loss)))
            }
        }
    }

    func resumeLanguageModel(_ saved: TrainConfig, dir: URL, backend: Backend) throws {
        var cfg = saved
        if let steps { cfg.steps = steps }
        let lm = cfg.lm!
        let model = try LlamaModel(config: lm, backend: backend, seed: cfg.seed, sequenceLength: cfg.seqLen, trainable: try trainablePredicate(),
                                   initialize: false)
        let data = try LMRecipe.sources(train: cfg.data, validation: cfg.evalData, tokenizer: lm.tokenizer, seqLen: cfg.seqLen)
        let run = try TrainRun(config: cfg, trainer: try Trainer(config: cfg, model: model, train: data.train, test: data.test), out: dir)
        try run.resume(from: dir)
        print("resuming \(dir.path) at step \(run.trainer.step) of \(cfg.steps) on \(backend.name)")
        try finishLM(run, label: "resumed")
    }

    func applyLM(to cfg: inout TrainConfig) {
        applyShared(to: &cfg)
        if let evalData { cfg.evalData = evalData }
        if let seqLen { cfg.seqLen = seqLen }
        if router == "dense" { cfg.lm?.moe = nil; cfg.lm?.moeLayers = [] }
        if let experts { cfg.lm?.moe?.experts = experts }
        if let topK { cfg.lm?.moe?.topK = topK }
    }

    /// nil: load the checkpoint as it is (or train from scratch).
    func upcycleMethod(initFrom: String) throws -> LMUpcycleMethod? {
        guard let upcycle else { return initFrom == "dense" ? .replicate : nil }
        if upcycle == "none" { return nil }
        guard let m = LMUpcycleMethod(rawValue: upcycle) else {
            throw CommandError("unknown --upcycle '\(upcycle)': use replicate, granular, recycle or none")
        }
        if m == .granular && (granularity ?? 1) < 2 { throw CommandError("--upcycle granular needs --granularity G of 2 or more") }
        return m
    }

    func routerSettings(_ r: String, base: MoEConfig) throws -> MoEConfig {
        var m = base
        switch r {
        case "expert-choice": m.router = "expert-choice"; m.capacityFactor = 2
        case "topk": break
        default: throw CommandError("router '\(r)' is not for language models: use topk or expert-choice (soft and sphero mix tokens across positions)")
        }
        return m
    }

    /// `--train all|experts|experts,router`: which parameters get gradients and optimiser state.
    func trainablePredicate() throws -> ((String) -> Bool)? {
        guard let train, train != "all" else { return nil }
        let parts = Set(train.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        guard !parts.isEmpty, parts.isSubset(of: ["experts", "router"]) else {
            throw CommandError("unknown --train '\(train)': use all, experts, or experts,router")
        }
        return { name in
            (parts.contains("experts") && name.contains(".experts.")) || (parts.contains("router") && name.contains(".block_sparse_moe.gate."))
        }
    }

    @discardableResult
    func finishLM(_ run: TrainRun, label: String) throws -> Double {
        let bar = ProgressLine(label: label)
        run.progress = { m, total in bar.update(m, total: total) }
        let (_, last) = try run.run()
        bar.done()
        let loss = run.evalLoss ?? .nan
        print(String(format: "%@: step %d, training loss %.4f, validation loss %.4f (perplexity %.2f), %.0f tokens/s; outputs in %@",
                     label, run.trainer.step, last?.loss ?? .nan, loss, exp(loss), last?.tokensPerSecond ?? 0, run.out.path))
        return loss
    }
}
