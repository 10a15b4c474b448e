import Foundation
import MoECompute

/// The built-in recipes: what `moe-gpu train` runs with no arguments.
public enum Recipe {
    /// A small ViT for 28x28 images: 16 patches of 7x7, width 64, 4 blocks.
    public static func denseModel() -> ViTConfig { ViTConfig() }

    /// MoE settings per router, sized for the default model.
    public static func moe(router: String, experts: Int? = nil) -> MoEConfig {
        var m = MoEConfig()
        m.router = router
        switch router {
        case "sphero":
            // MoE Jetpack: a third core experts (half the dense MLP width, recycled),
            // the rest universal experts at a quarter of that; cosine routing.
            m.experts = experts ?? 6; m.slotsPerExpert = 2; m.coreExperts = max(1, m.experts / 3)
            m.expertWidthRatio = 0.5; m.universalWidthRatio = 0.25
            // The paper's dropout (0.4) and stochastic depth (0.1) regularise long
            // ImageNet runs; a 600-step fine-tune underfits, so both start off here.
            m.dropout = 0; m.stochasticDepth = 0; m.temperatureInit = 0.5
        case "soft":
            m.experts = experts ?? 6; m.slotsPerExpert = 2; m.expertWidthRatio = 0.5
        case "expert-choice":
            m.experts = experts ?? 8; m.capacityFactor = 2; m.expertWidthRatio = 1
        default:
            m.experts = experts ?? 8; m.topK = 2; m.expertWidthRatio = 1; m.renormalize = true
        }
        return m
    }

    /// Expert widths an upcycling method needs: replicate makes full-width experts
    /// (a SpheroMoE's all core, no universal experts); granular G shards of the
    /// MLP per copy, k = G unless set (one whole copy per token at the start).
    public static func shapeExperts(_ m: inout MoEConfig, for method: String?, granularity: Int?, topK: Int?) {
        switch method {
        case "replicate":
            m.expertWidthRatio = 1
            if m.router == "sphero" { m.coreExperts = m.experts }
        case "granular":
            let g = max(granularity ?? 2, 1)
            m.expertWidthRatio = 1 / Double(g)
            m.topK = topK ?? g
            m.renormalize = true
        default: break
        }
    }

    /// The default fine-tuning run: MoE Jetpack (SpheroMoE in the last two blocks).
    public static func defaultFineTune() -> TrainConfig {
        var c = TrainConfig()
        c.model = denseModel()
        c.model.moeBlocks = [2, 3]
        c.model.moe = moe(router: "sphero")
        c.steps = 1500
        c.batchSize = 64
        // Short runs on this small model underfit: no augmentation, a high peak rate.
        c.augment = false
        c.learningRate = 1e-3
        c.warmupSteps = 20
        c.evalEvery = 500
        c.testExamples = nil
        return c
    }

    /// The dense pretraining run the default recipe starts from.
    public static func densePretrain(like c: TrainConfig, steps: Int?, learningRate: Float? = nil) -> TrainConfig {
        var d = c
        d.model.moeBlocks = []
        d.model.moe = nil
        d.steps = steps ?? 5000
        d.learningRate = learningRate ?? 3e-3
        d.warmupSteps = 50
        d.evalEvery = 0
        // Settings that do not change the trained weights stay out of the cache key.
        d.testExamples = nil
        d.logEvery = TrainConfig().logEvery
        return d
    }

    public static var cacheDirectory: URL { ProgramCache.defaultDirectory.appendingPathComponent("models") }

    /// Where the pretrained dense model for `c` is cached (named by a hash of its pretraining config).
    public static func pretrainedDenseDirectory(for c: TrainConfig, steps: Int?, learningRate: Float? = nil) throws -> URL {
        try cacheFolder("dense", for: densePretrain(like: c, steps: steps, learningRate: learningRate))
    }

    /// `cacheDirectory/PREFIX-HASH`, HASH the FNV-1a of the config's sorted JSON: one
    /// folder per pretraining config, whatever produced it.
    static func cacheFolder(_ prefix: String, for config: TrainConfig) throws -> URL {
        let key = String(decoding: try JSONEncoder.sorted.encode(config), as: UTF8.self)
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return cacheDirectory.appendingPathComponent(String(format: "%@-%016llx", prefix, h))
    }

    /// The pretrained dense model for `c` (its MoE layers made dense), from the
    /// cache when an earlier run trained the same config, else trained now.
    /// Returns it with its test accuracy.
    public static func pretrainedDense(for c: TrainConfig, steps: Int?, learningRate: Float? = nil, backend: Backend,
                                       data: (train: ImageDataset, test: ImageDataset),
                                       log: @escaping (String) -> Void = { print($0) }) throws -> (ViT, Double) {
        let d = densePretrain(like: c, steps: steps, learningRate: learningRate)
        let dir = try pretrainedDenseDirectory(for: c, steps: steps, learningRate: learningRate)
        let model = try ViT(config: d.model, backend: backend, seed: d.seed)
        let trainer = try Trainer(config: d, model: model, train: data.train, test: data.test)
        if let file = TrainRun.modelFile(in: dir), (try? ModelCheckpoint.load(file.path, into: model)) != nil {
            let acc = try trainer.evaluate(limit: d.testExamples)   // as the pretraining run evaluated it
            log(String(format: "dense: reusing the pretrained ViT in %@ (test accuracy %.2f%%)", dir.path, 100 * acc))
            return (model, acc)
        }
        // A pretraining stopped before its first checkpoint starts again from nothing.
        TrainRun.clearRun(dir)
        log("dense: pretraining a \(model.params.parameterCount)-parameter ViT for \(d.steps) steps (cached in \(dir.path) for later runs)")
        let run = try TrainRun(config: d, model: model, out: dir, data: data)
        run.progress = { m, total in
            if m.step % 100 == 0 || m.step == total {
                log(String(format: "dense step %d/%d  loss %.4f  %.0f tok/s", m.step, total, m.loss, m.tokensPerSecond))
            }
        }
        let (acc, _) = try run.run()
        log(String(format: "dense: test accuracy %.2f%%", 100 * acc))
        return (model, acc)
    }

    /// Token inputs of the first `count` training images, for recycling's importance statistics.
    public static func calibrationPatches(_ data: ImageDataset, model: ViTConfig, count: Int, backend: Backend) throws -> Tensor {
        let n = min(count, data.count)
        let source = ImageBatchSource(data, model: model, augment: false)
        var inputs = [Float](repeating: 0, count: n * model.tokens * model.patchDim)
        var labels = [Int32](repeating: 0, count: n)
        inputs.withUnsafeMutableBytes { i in labels.withUnsafeMutableBufferPointer { source.fill(indices: Array(0..<n), augmentSeed: nil, inputs: i, labels: $0) } }
        return try backend.tensor(inputs, shape: source.inputShape(batch: n))
    }
}
