import Foundation
import MoECompute

/// Everything about one training run, as a plain JSON file a person can read.
public struct TrainConfig: Codable, Equatable, Sendable {
    public var model = ViTConfig()
    /// Folder of MNIST-format IDX files (default Fashion-MNIST from Debian's dataset-fashion-mnist).
    public var data: String? = nil
    /// Use only the first N training / test examples (nil: all).
    public var trainExamples: Int? = nil
    public var testExamples: Int? = 2000
    public var batchSize = 64
    public var steps = 300
    public var learningRate: Float = 1e-3
    public var minLearningRate: Float = 1e-5
    public var warmupSteps = 20
    public var weightDecay: Float = 0.05
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    public var clipNorm: Float = 1.0
    public var labelSmoothing: Float = 0.1
    public var gradientAccumulation = 1
    public var evalEvery = 100
    public var logEvery = 10
    public var augment = true
    public var seed: UInt64 = 0

    public init() {}

    public func validate() throws {
        try check(batchSize >= 1 && steps >= 0 && gradientAccumulation >= 1, "batchSize, gradientAccumulation must be >= 1 and steps >= 0")
        try check(learningRate > 0 && minLearningRate >= 0 && warmupSteps >= 0, "learning rates must be positive")
        try check(labelSmoothing >= 0 && labelSmoothing < 1, "labelSmoothing must be in [0, 1)")
        try check(evalEvery >= 0 && logEvery >= 1, "evalEvery must be >= 0 and logEvery >= 1")
        try model.validate()
    }

    /// Linear warm-up to the peak, then cosine decay to the floor.
    public func learningRate(at step: Int) -> Float {
        if step <= warmupSteps && warmupSteps > 0 { return learningRate * Float(step) / Float(warmupSteps) }
        let span = max(steps - warmupSteps, 1)
        let progress = min(1, Float(step - warmupSteps) / Float(span))
        return minLearningRate + 0.5 * (learningRate - minLearningRate) * (1 + cos(.pi * progress))
    }
}

public enum TrainError: Error, CustomStringConvertible {
    case nonFinite(step: Int, what: String)
    public var description: String {
        switch self {
        case .nonFinite(let step, let what):
            return "\(what) became NaN or infinite at step \(step): lower --lr or raise clipping; the last good checkpoint was kept"
        }
    }
}

/// One line of metrics.jsonl.
public struct StepMetrics: Sendable {
    public var step: Int
    public var loss: Float
    public var aux: [String: Float]
    public var learningRate: Float
    public var gradNorm: Float
    public var tokensPerSecond: Double
    public var elapsed: Double
    public var accuracy: Double?
    public var expertLoad: [String: [Int]]

    public var json: [String: Any] {
        var o: [String: Any] = ["step": step, "loss": loss, "lr": learningRate, "grad_norm": gradNorm,
                                "tokens_per_s": tokensPerSecond, "elapsed_s": elapsed]
        for (k, v) in aux { o[k] = v }
        if let accuracy { o["accuracy"] = accuracy }
        if !expertLoad.isEmpty { o["expert_load"] = expertLoad }
        return o
    }
}

/// Forward, loss, backward, clip, AdamW: the training loop on one backend.
public final class Trainer {
    public let config: TrainConfig
    public let model: ViT
    public let train: ImageDataset, test: ImageDataset
    public private(set) var step = 0
    var backend: Backend { model.backend }
    private let patchify: Patchify
    private var order: [Int] = []
    private var cursor = 0
    private var rng: SplitMix64

    public init(config: TrainConfig, model: ViT, train: ImageDataset, test: ImageDataset) throws {
        try config.validate()
        let m = model.config
        guard train.channels == m.channels, train.height == m.imageSize, train.width == m.imageSize else {
            throw ModelError.badInput("data images are \(train.channels)x\(train.height)x\(train.width), the model expects \(m.channels)x\(m.imageSize)x\(m.imageSize)")
        }
        guard train.classes <= m.classes else { throw ModelError.badInput("data has \(train.classes) classes, the model \(m.classes)") }
        self.config = config; self.model = model; self.train = train; self.test = test
        var p = Patchify(patchSize: m.patchSize)
        if config.augment { p.cropPadding = 2; p.flip = true }
        patchify = p
        rng = SplitMix64(seed: config.seed &+ 0x5EED)
    }

    /// The next batch of example indices: a seeded shuffle, reshuffled every epoch.
    private func nextIndices(_ n: Int) -> [Int] {
        var out: [Int] = []
        while out.count < n {
            if cursor >= order.count {
                order = Array(0..<train.count)
                order.shuffle(using: &rng)
                cursor = 0
            }
            let take = min(n - out.count, order.count - cursor)
            out += order[cursor..<(cursor + take)]
            cursor += take
        }
        return out
    }

    /// Skips the data of `steps` steps, so a resumed run sees the batches it would have seen.
    public func fastForward(to target: Int) {
        while step < target {
            for _ in 0..<config.gradientAccumulation { _ = nextIndices(config.batchSize) }
            step += 1
        }
    }

    /// Runs one optimiser step; returns its metrics (accuracy not filled).
    public func trainStep() throws -> StepMetrics {
        let start = Date()
        step += 1
        let b = backend, batch = config.batchSize, c = model.config
        try model.params.zeroGradients()
        let labels = try b.zeros([batch], dtype: .i32)
        let rowLoss = try b.zeros([batch]), meanLoss = try b.zeros([1]), dLogits = try b.zeros([batch, c.classes])
        var lossSum: Float = 0
        var aux: [String: Float] = [:]
        // Augmentation draws from a generator keyed by the step, so a resumed run
        // sees exactly the batches it would have seen.
        var augmentRng = SplitMix64(seed: config.seed ^ (UInt64(step) &* 0xD1B5_4A32_D192_ED03))
        for _ in 0..<config.gradientAccumulation {
            let idx = nextIndices(batch)
            let patches = try b.tensor(patchify.patches(train, indices: idx, rng: &augmentRng, augment: config.augment),
                                       shape: [batch, c.patches, c.patchDim])
            try labels.write(idx.map { train.labels[$0] })
            let logits = try model.forward(patches: patches, training: true, step: step)
            try b.crossEntropy(logits: logits, labels: labels, labelSmoothing: config.labelSmoothing, rowLoss: rowLoss,
                               meanLoss: meanLoss, dLogits: dLogits, gradientScale: 1 / Float(config.gradientAccumulation))
            try model.backward(dLogits: dLogits, patches: patches)
            lossSum += try meanLoss.floats()[0]
            for (k, v) in try model.routingStats().aux { aux[k, default: 0] += v / Float(config.gradientAccumulation) }
        }
        let loss = lossSum / Float(config.gradientAccumulation)
        guard loss.isFinite else { throw TrainError.nonFinite(step: step, what: "the loss") }
        let grads = model.params.all.map(\.grad)
        let norm = config.clipNorm > 0 ? try b.clipGradients(grads, maxNorm: config.clipNorm) : try b.globalNorm(grads)
        guard norm.isFinite else { throw TrainError.nonFinite(step: step, what: "the gradient norm") }
        let lr = config.learningRate(at: step)
        let groups = model.params.all.map {
            AdamWTensors(param: $0.value, grad: $0.grad, m: $0.m, v: $0.v, weightDecay: $0.decays ? config.weightDecay : 0)
        }
        try b.adamWStep(groups, config: AdamWConfig(learningRate: lr, beta1: config.beta1, beta2: config.beta2, eps: 1e-8), step: step)
        try b.synchronize()
        let seconds = Date().timeIntervalSince(start)
        let tokens = Double(batch * config.gradientAccumulation * c.tokens)
        return StepMetrics(step: step, loss: loss + aux.values.reduce(0, +), aux: aux, learningRate: lr, gradNorm: norm,
                           tokensPerSecond: tokens / seconds, elapsed: seconds, accuracy: nil,
                           expertLoad: try model.expertLoads())
    }

    /// Top-1 accuracy on the first `limit` test examples.
    public func evaluate(limit: Int? = nil) throws -> Double {
        let b = backend, c = model.config
        let n = min(limit ?? test.count, test.count)
        guard n > 0 else { return 0 }
        var correct = 0
        var noRng = SplitMix64(seed: 0)
        let evalBatch = 250
        var start = 0
        while start < n {
            let idx = Array(start..<min(start + evalBatch, n))
            let patches = try b.tensor(patchify.patches(test, indices: idx, rng: &noRng, augment: false),
                                       shape: [idx.count, c.patches, c.patchDim])
            let logits = try model.forward(patches: patches, training: false, step: step)
            let pred = try b.zeros([idx.count], dtype: .i32)
            try b.argmaxRows(logits, out: pred)
            for (i, p) in try pred.ints().enumerated() where p == test.labels[idx[i]] { correct += 1 }
            start += evalBatch
        }
        return Double(correct) / Double(n)
    }
}
