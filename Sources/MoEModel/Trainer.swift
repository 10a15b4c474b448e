import Foundation
import MoECompute

/// Everything about one training run, as a plain JSON file a person can read.
public struct TrainConfig: Codable, Equatable, Sendable {
    /// "image" (the ViT in `model`) or "lm" (the decoder language model in `lm`).
    public var task = "image"
    public var model = ViTConfig()
    /// The language model (task "lm").
    public var lm: LMConfig? = nil
    /// Tokens per training window (task "lm").
    public var seqLen = 256
    /// Validation text (task "lm"); nil: the default corpus's validation plays, or
    /// the last 5% of the training text when `data` is given.
    public var evalData: String? = nil
    /// Examples per evaluation batch (nil: 250 images, or `batchSize` windows).
    public var evalBatchSize: Int? = nil
    /// Steps between checkpoints (nil: at every evaluation; 0: only at the end).
    /// A large model's checkpoint and optimizer state are gigabytes to write.
    public var checkpointEvery: Int? = nil
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
    /// Steps whose loss or gradient is NaN/infinite that may be skipped (the step
    /// counts, the update does not, the data order is unchanged) before the run stops; nil: none.
    public var skipNonFinite: Int? = nil
    /// ZeRO stage under data parallelism: 0 (nil) keeps AdamW's moments on
    /// every rank; 1 splits them over the ranks (each updates its share of the
    /// parameters and broadcasts it), a third of the memory of full state on 2 ranks.
    public var zeroStage: Int? = nil

    public init() {}

    public func validate() throws {
        try check(batchSize >= 1, "batchSize \(batchSize) must be at least 1")
        try check(steps >= 1, "steps \(steps) must be at least 1")
        try check(gradientAccumulation >= 1, "gradientAccumulation \(gradientAccumulation) must be at least 1")
        try check([0, 1].contains(zeroStage ?? 0), "zeroStage \(zeroStage ?? 0) is not supported: use 0 (moments on every rank) or 1 (moments split over the ranks)")
        try check((skipNonFinite ?? 0) >= 0, "skipNonFinite \(skipNonFinite ?? 0) must not be negative")
        try check(learningRate > 0 && minLearningRate >= 0 && warmupSteps >= 0, "learning rates must be positive")
        try check(labelSmoothing >= 0 && labelSmoothing < 1, "labelSmoothing must be in [0, 1)")
        try check(evalEvery >= 0 && logEvery >= 1, "evalEvery must be >= 0 and logEvery >= 1")
        try check(task == "image" || task == "lm", "task must be image or lm, got \"\(task)\"")
        if task == "lm" {
            guard let lm else { throw ModelError.badConfig("task lm needs an lm model config") }
            try lm.validate()
            try check(seqLen >= 1 && seqLen <= lm.maxPositions, "seqLen \(seqLen) must be in 1...\(lm.maxPositions) (the model's context): lower --seq-len")
        } else {
            try model.validate()
        }
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
    case nonFinite(step: Int, what: String, parameter: String?)
    public var description: String {
        switch self {
        case .nonFinite(let step, let what, let parameter):
            let first = parameter.map { " (first non-finite gradient: \($0))" } ?? ""
            return "\(what) became NaN or infinite at step \(step)\(first): lower --lr or raise clipping, or skip such steps with --skip-nonfinite N; the last good checkpoint was kept"
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
    /// Mean test cross-entropy (without label smoothing), with the accuracy.
    public var evalLoss: Double?
    public var expertLoad: [String: [Int]]
    /// Steps skipped so far for a non-finite loss or gradient (`skipNonFinite`).
    public var nonFiniteSkipped = 0
    /// Data parallel: bytes this rank handed to allreduce in the step (gradients and loss terms).
    public var allreduceBytes = 0
    /// ZeRO-1: bytes of parameters broadcast from their owners to every rank after the update.
    public var parameterBroadcastBytes = 0
    /// Expert parallel: bytes this rank sent to other ranks' experts (all-to-all, forward and backward).
    public var allToAllBytes = 0

    public var json: [String: Any] {
        // JSON has no NaN: a non-finite value (a skipped step) is left out.
        var o: [String: Any] = ["step": step, "lr": learningRate, "tokens_per_s": tokensPerSecond, "elapsed_s": elapsed]
        if loss.isFinite { o["loss"] = loss }
        if gradNorm.isFinite { o["grad_norm"] = gradNorm }
        if nonFiniteSkipped > 0 { o["nonfinite_skipped"] = nonFiniteSkipped }
        if allreduceBytes > 0 { o["allreduce_bytes"] = allreduceBytes }
        if parameterBroadcastBytes > 0 { o["parameter_broadcast_bytes"] = parameterBroadcastBytes }
        if allToAllBytes > 0 { o["alltoall_bytes"] = allToAllBytes }
        for (k, v) in aux where v.isFinite { o[k] = v }
        if let accuracy { o["accuracy"] = accuracy }
        if let evalLoss, evalLoss.isFinite { o["eval_loss"] = evalLoss }
        if !expertLoad.isEmpty { o["expert_load"] = expertLoad }
        return o
    }
}

/// A batch on the device and the host memory it is prepared in.
final class DeviceBatch {
    let inputs: Tensor, labels: Tensor
    var hostInputs: [UInt8], hostLabels: [Int32]
    init(source: BatchSource, batch: Int, backend: Backend) throws {
        inputs = try backend.zeros(source.inputShape(batch: batch), dtype: source.inputType)
        labels = try backend.zeros([source.labelCount(batch: batch)], dtype: .i32)
        hostInputs = [UInt8](repeating: 0, count: inputs.count * 4)
        hostLabels = [Int32](repeating: 0, count: labels.count)
    }

    /// Fills the host copy from `source` and uploads it without waiting.
    func load(_ source: BatchSource, indices: [Int], augmentSeed: UInt64?) throws {
        hostInputs.withUnsafeMutableBytes { i in
            hostLabels.withUnsafeMutableBufferPointer { l in source.fill(indices: indices, augmentSeed: augmentSeed, inputs: i, labels: l) }
        }
        let backend = inputs.backend
        try hostInputs.withUnsafeBytes { try backend.upload($0, to: inputs) }
        try hostLabels.withUnsafeBytes { try backend.upload($0, to: labels) }
    }
}

/// The one small buffer a step's results go to, read once per step: the
/// loss, the gradient norm, the auxiliary losses by name and the expert loads
/// (as i32 bits) of every routed layer. Which layer's tensor goes to which slot
/// is fixed when the trainer is built, so a step only enqueues the adds and copies.
final class StepMetricsBuffer {
    let buffer: Tensor
    let loss: Tensor, gradNorm: Tensor
    /// The loss, the (not yet computed) gradient norm and the auxiliary losses: the floats ranks sum.
    let lossTerms: Tensor
    /// A routed layer's unweighted loss, its coefficient and the slot it adds into.
    let auxTerms: [(value: Tensor, coefficient: Float, slot: Tensor)]
    /// A routed layer with expert loads and its slot (i32 bits) of the buffer.
    let loadSlots: [(name: String, layer: RoutedLayer, slot: Tensor)]
    private let auxNames: [String]

    init(model: Model) throws {
        let routed = model.routedLayers
        var names: [String] = []
        for (_, layer) in routed { for a in layer.auxiliaryLossTensors where !names.contains(a.name) { names.append(a.name) } }
        let loadCount = routed.reduce(0) { $0 + $1.layer.loadCount }
        buffer = try model.backend.zeros([2 + names.count + loadCount])
        loss = try buffer.view(offset: 0, shape: [1])
        gradNorm = try buffer.view(offset: 1, shape: [1])
        lossTerms = try buffer.view(offset: 0, shape: [2 + names.count])
        var terms: [(value: Tensor, coefficient: Float, slot: Tensor)] = []
        for (_, layer) in routed {
            for a in layer.auxiliaryLossTensors {
                terms.append((a.value, a.coefficient, try buffer.view(offset: 2 + names.firstIndex(of: a.name)!, shape: [1])))
            }
        }
        let ints = buffer.bitcast(to: .i32)
        var offset = 2 + names.count
        var slots: [(name: String, layer: RoutedLayer, slot: Tensor)] = []
        for (name, layer) in routed where layer.loadCount > 0 {
            slots.append((name, layer, try ints.view(offset: offset, shape: [layer.loadCount])))
            offset += layer.loadCount
        }
        auxTerms = terms; loadSlots = slots; auxNames = names
    }

    /// The one host sync of a step.
    func read() throws -> (loss: Float, gradNorm: Float, aux: [String: Float], loads: [String: [Int]]) {
        let v = try buffer.floats()
        var aux: [String: Float] = [:]
        for (i, n) in auxNames.enumerated() { aux[n] = v[2 + i] }
        var loads: [String: [Int]] = [:]
        for (name, _, slot) in loadSlots {
            let start = slot.offset - buffer.offset
            loads[name] = v[start..<(start + slot.count)].map { Int(Int32(bitPattern: $0.bitPattern)) }
        }
        return (v[0], v[1], aux, loads)
    }
}

/// Forward, loss, backward, clip, AdamW: the training loop on one backend, for any `Model`.
///
/// A step is enqueued without waiting: batches are prepared on the host and
/// uploaded without blocking (the next step's while this one runs), every
/// tensor comes from workspaces sized on the first step, and the loss, the
/// auxiliary losses, the gradient norm and the expert loads land in one small
/// buffer read once at the end of the step (the NaN check). AdamW skips its
/// update on the device when the norm is not finite, so a bad step changes nothing.
public final class Trainer {
    public let config: TrainConfig
    public let model: Model
    public let train: BatchSource, test: BatchSource
    public private(set) var step = 0
    public let optimizer: OptimizerState
    var backend: Backend { model.backend }
    private var order: [Int] = []
    private var cursor = 0
    private var rng: SplitMix64
    private let metrics: StepMetricsBuffer
    // Double-buffered micro-batches: [step parity][micro-batch].
    private var batches: [[DeviceBatch]] = []
    private var preparedStep = 0
    // Loss scratch of the training batch and of the evaluation batch.
    private let ws: Workspace
    /// Data parallel: `gradientAccumulation` is the step's number of
    /// micro-batches over all ranks (the global batch is `batchSize x
    /// gradientAccumulation` however many ranks run it); rank r runs the r-th
    /// share of them, in the data order one process would see, then gradients
    /// and loss terms are summed over the ranks. N ranks equal one process, and
    /// a run resumes on any number of ranks that divides `gradientAccumulation`.
    public let communicator: Communicator
    /// Who owns which parameters over the ranks (`ParameterStore.partition`).
    public let ownership: Ownership
    /// ZeRO-1: whether this rank keeps only its share of the moments.
    let shardsOptimizer: Bool
    /// The trainable ranges every rank holds whole (their gradients summed over
    /// all ranks) and those of this rank's own experts under expert parallelism
    /// (summed over the ranks that hold the same experts).
    private let wholeRanges: [Range<Int>], expertRanges: [Range<Int>]
    /// ZeRO-1: the ranges each rank (of all) and each expert replica updates and broadcasts.
    private let ownedRanges: [[Range<Int>]], ownedExpertRanges: [[Range<Int>]]
    /// Bytes a step hands to the gradient allreduce and to ZeRO-1's broadcasts (the metrics).
    private let allreduceBytes: Int, broadcastBytes: Int
    /// Micro-batches this rank runs per step.
    var microBatchesPerRank: Int { config.gradientAccumulation / communicator.size }

    public init(config: TrainConfig, model: Model, train: BatchSource, test: BatchSource) throws {
        try config.validate()
        self.config = config; self.model = model; self.train = train; self.test = test
        rng = SplitMix64(seed: config.seed &+ 0x5EED)
        communicator = Distributed.world
        let replicas = Distributed.expertReplicas
        shardsOptimizer = communicator.size > 1 && (config.zeroStage ?? 0) >= 1
        ownership = model.params.partition(communicator.size, replicas: replicas.size)
        optimizer = OptimizerState(store: model.params, shard: shardsOptimizer ? ownership.optimizerShard(of: communicator.rank, replica: replicas.rank) : nil)
        wholeRanges = ParameterStore.ranges(of: model.params.all.filter { $0.trainable && $0.expertRows == nil })
        expertRanges = ParameterStore.ranges(of: model.params.all.filter { $0.trainable && $0.expertRows != nil })
        ownedRanges = (0..<communicator.size).map(ownership.owned)
        ownedExpertRanges = expertRanges.isEmpty || replicas.size == 1 ? [] : (0..<replicas.size).map(ownership.ownedExperts)
        metrics = try StepMetricsBuffer(model: model)
        // Expert gradients and parameters cross ranks only where several groups hold the same experts.
        let whole = wholeRanges.reduce(0) { $0 + $1.count }, experts = replicas.size > 1 ? expertRanges.reduce(0) { $0 + $1.count } : 0
        allreduceBytes = communicator.size > 1 ? 4 * (whole + experts + metrics.lossTerms.count) : 0
        broadcastBytes = shardsOptimizer ? 4 * (whole + experts) : 0
        ws = Workspace(backend: model.backend)
        guard config.gradientAccumulation % communicator.size == 0 else {
            throw ModelError.badConfig("gradientAccumulation \(config.gradientAccumulation) micro-batches per step do not split over \(communicator.size) ranks: make it a multiple of \(communicator.size) with --gradient-accumulation (the global batch is batchSize x gradientAccumulation)")
        }
    }

    /// The ViT on image datasets (the trainer the `train` command runs).
    public convenience init(config: TrainConfig, model: ViT, train: ImageDataset, test: ImageDataset) throws {
        let m = model.config
        guard train.channels == m.channels, train.height == m.imageSize, train.width == m.imageSize else {
            throw ModelError.badInput("data images are \(train.channels)x\(train.height)x\(train.width), the model expects \(m.channels)x\(m.imageSize)x\(m.imageSize)")
        }
        guard train.classes <= m.classes else { throw ModelError.badInput("data has \(train.classes) classes, the model \(m.classes)") }
        try self.init(config: config, model: model as Model,
                      train: ImageBatchSource(train, model: m, augment: config.augment),
                      test: ImageBatchSource(test, model: m, augment: false))
    }

    /// The next batch of example indices: a seeded shuffle, reshuffled every epoch.
    private func nextIndices(_ n: Int) -> [Int] {
        var out: [Int] = []
        out.reserveCapacity(n)
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
    /// `nonFiniteSkipped`: the count at that step, so `--skip-nonfinite N` bounds the whole run.
    public func fastForward(to target: Int, nonFiniteSkipped skipped: Int = 0) {
        nonFiniteSkipped = skipped
        while step < target {
            for _ in 0..<config.gradientAccumulation { _ = nextIndices(config.batchSize) }
            step += 1
        }
        preparedStep = 0
    }

    /// Prepares and uploads (without waiting) the micro-batches of step `s`.
    private func prepare(step s: Int) throws {
        if batches.isEmpty {
            batches = try (0..<2).map { _ in
                try (0..<microBatchesPerRank).map { _ in try DeviceBatch(source: train, batch: config.batchSize, backend: backend) }
            }
        }
        let n = microBatchesPerRank, mine = communicator.rank * n
        for micro in 0..<config.gradientAccumulation {
            let indices = nextIndices(config.batchSize)
            guard (mine..<(mine + n)).contains(micro) else { continue }   // another rank's
            // Augmentation draws from a generator keyed by the step and micro-batch,
            // so a resumed run sees exactly the batches it would have seen.
            let seed = config.augment ? config.seed ^ (UInt64(s) &* 0xD1B5_4A32_D192_ED03) ^ (UInt64(micro) &* 0x9E37_79B9_7F4A_7C15) : nil
            try batches[s % 2][micro - mine].load(train, indices: indices, augmentSeed: seed)
        }
        preparedStep = s
    }

    /// Runs one optimiser step; returns its metrics (accuracy not filled, tokens/s
    /// from this step alone: `TrainRun` measures it over the logging window).
    public func trainStep() throws -> StepMetrics {
        let start = Date()
        step += 1
        let b = backend, n = config.gradientAccumulation, scale = 1 / Float(n)
        if preparedStep != step { try prepare(step: step) }
        try model.params.zeroGradients()
        try b.fill(metrics.buffer, value: 0)
        _ = ExpertExchange.takeBytesSent()
        let batch = config.batchSize
        for micro in batches[step % 2] {
            let logits = try model.forward(micro.inputs, training: true, step: step)
            let rows = micro.labels.count, classes = logits.count / max(rows, 1)
            let rowLoss = try ws.get("rowLoss", [rows]), meanLoss = try ws.get("meanLoss", [1])
            let dLogits = try ws.get("dLogits", [rows, classes])
            try b.crossEntropy(logits: logits, labels: micro.labels, labelSmoothing: config.labelSmoothing, rowLoss: rowLoss,
                               meanLoss: meanLoss, dLogits: dLogits, gradientScale: scale)
            try b.axpy(scale, meanLoss, metrics.loss)
            try model.backward(dLogits: dLogits, inputs: micro.inputs, lossScale: scale)
            for term in metrics.auxTerms { try b.axpy(term.coefficient * scale, term.value, term.slot) }
        }
        // Expert loads of the last micro-batch, as i32 bits in the metrics buffer.
        for load in metrics.loadSlots {
            if let counts = load.layer.expertCounts { try b.copy(counts, to: load.slot) }
        }
        guard let grads = model.params.gradients else { throw ModelError.badInput("the model was built without gradients (inference only)") }
        if communicator.size > 1 {
            for r in wholeRanges { try communicator.allreduceSum(try grads.view(offset: r.lowerBound, shape: [r.count])) }
            if Distributed.expertReplicas.size > 1 {
                for r in expertRanges { try Distributed.expertReplicas.allreduceSum(try grads.view(offset: r.lowerBound, shape: [r.count])) }
            }
            try communicator.allreduceSum(metrics.lossTerms)
        }
        if expertRanges.isEmpty || Distributed.expertGroup.size == 1 {
            try b.globalNorm([grads], into: metrics.gradNorm)
        } else {
            // The experts' gradients are spread over the expert group: the global norm is
            // sqrt(|whole|^2 + the group's sum of |own experts|^2), combined on the host (two syncs).
            let norms = try ws.get("norms", [2])
            try b.globalNorm(try wholeRanges.map { try grads.view(offset: $0.lowerBound, shape: [$0.count]) }, into: try norms.view(offset: 0, shape: [1]))
            try b.globalNorm(try expertRanges.map { try grads.view(offset: $0.lowerBound, shape: [$0.count]) }, into: try norms.view(offset: 1, shape: [1]))
            let v = try norms.floats()
            var own = [Double(v[1]) * Double(v[1])]
            try own.withUnsafeMutableBufferPointer { try Distributed.expertGroup.allreduceSum($0) }
            try metrics.gradNorm.write([Float((Double(v[0]) * Double(v[0]) + own[0]).squareRoot())])
        }
        if config.clipNorm > 0 { try b.clipByNorm([grads], maxNorm: config.clipNorm, norm: metrics.gradNorm) }
        let lr = config.learningRate(at: step)
        try optimizer.step(config: AdamWConfig(learningRate: lr, beta1: config.beta1, beta2: config.beta2, eps: 1e-8),
                           weightDecay: config.weightDecay, step: step, guardNorm: metrics.gradNorm)
        if shardsOptimizer, let values = model.params.values {
            // ZeRO-1: every rank updated the parameters it owns and sends them to the others;
            // experts go among the ranks holding the same ones (one per expert-parallel group).
            for (comm, owned) in [(communicator, ownedRanges), (Distributed.expertReplicas, ownedExpertRanges)] {
                for (owner, ranges) in owned.enumerated() {
                    for r in ranges { try comm.broadcast(try values.view(offset: r.lowerBound, shape: [r.count]), root: owner) }
                }
            }
        }
        // The next step's batches go up while this one runs (on a device that queues).
        if step < config.steps { try prepare(step: step + 1) }
        let r = try metrics.read()
        let seconds = Date().timeIntervalSince(start)
        let tokens = Double(batch * n * model.tokensPerExample)
        var m = StepMetrics(step: step, loss: r.loss + r.aux.values.reduce(0, +), aux: r.aux, learningRate: lr, gradNorm: r.gradNorm,
                            tokensPerSecond: tokens / seconds, elapsed: seconds, accuracy: nil, expertLoad: r.loads)
        if !r.loss.isFinite || !r.gradNorm.isFinite {
            // AdamW already skipped the update on the device (its norm guard).
            guard nonFiniteSkipped < config.skipNonFinite ?? 0 else {
                throw TrainError.nonFinite(step: step, what: r.loss.isFinite ? "the gradient norm" : "the loss", parameter: try firstNonFiniteGradient())
            }
            nonFiniteSkipped += 1
        }
        m.nonFiniteSkipped = nonFiniteSkipped
        m.allreduceBytes = allreduceBytes
        m.parameterBroadcastBytes = broadcastBytes
        m.allToAllBytes = ExpertExchange.takeBytesSent()
        return m
    }

    /// Steps skipped so far for a non-finite loss or gradient.
    public private(set) var nonFiniteSkipped = 0

    /// The first parameter (in model order) whose gradient holds a NaN or an
    /// infinity: read on the failure path only.
    func firstNonFiniteGradient() throws -> String? {
        for p in model.params.all where p.trainable {
            if try p.gradient().floats().contains(where: { !$0.isFinite }) { return p.name }
        }
        return nil
    }

    /// Top-1 accuracy on the first `limit` test examples.
    public func evaluate(limit: Int? = nil) throws -> Double { try evaluateWithLoss(limit: limit).accuracy }

    /// Top-1 accuracy and mean cross-entropy (no label smoothing) on the first
    /// `limit` test examples, over every label that is not ignored (one per image;
    /// every predicted token of a language model's windows).
    public func evaluateWithLoss(limit: Int? = nil) throws -> (accuracy: Double, loss: Double) {
        let r = try evaluateCounts(limit: limit)
        return (Double(r.correct) / Double(max(r.targets, 1)), r.targets > 0 ? r.lossSum / Double(r.targets) : .nan)
    }

    /// Correct predictions, the summed cross-entropy and the number of targets counted.
    public func evaluateCounts(limit: Int? = nil) throws -> (correct: Int, lossSum: Double, targets: Int) {
        let b = backend
        let n = min(limit ?? test.count, test.count)
        guard n > 0 else { return (0, 0, 0) }
        let evalBatch = min(config.evalBatchSize ?? (config.task == "lm" ? config.batchSize : 250), n)
        var correct = 0, targets = 0
        var lossSum = 0.0
        var start = 0
        while start < n {
            let count = min(evalBatch, n - start)
            let device = try evalBatches(count)
            try device.load(test, indices: Array(start..<(start + count)), augmentSeed: nil)
            let logits = try model.forward(device.inputs, training: false, step: step)
            let rows = device.labels.count
            let out = try ws.get("evalOut", [rows + 1])
            let pred = try ws.get("evalPred", [rows], dtype: .i32)
            try b.argmaxRows(logits, out: pred)
            try b.crossEntropy(logits: logits, labels: device.labels, labelSmoothing: 0, rowLoss: try ws.get("evalRowLoss", [rows]),
                               meanLoss: try out.view(offset: rows, shape: [1]), dLogits: nil, gradientScale: 1)
            // Predictions (as i32 bits) and the batch loss in one read.
            try b.copy(pred, to: try out.view(offset: 0, shape: [rows]).bitcast(to: .i32))
            let v = try out.floats()
            var counted = 0
            for i in 0..<rows where device.hostLabels[i] >= 0 {
                counted += 1
                if Int32(bitPattern: v[i].bitPattern) == device.hostLabels[i] { correct += 1 }
            }
            // The mean is over this batch's counted targets.
            if counted > 0 { lossSum += Double(v[rows]) * Double(counted) }
            targets += counted
            start += count
        }
        return (correct, lossSum, targets)
    }

    private var evalBatchBySize: [Int: DeviceBatch] = [:]
    private func evalBatches(_ size: Int) throws -> DeviceBatch {
        if let d = evalBatchBySize[size] { return d }
        let d = try DeviceBatch(source: test, batch: size, backend: backend)
        evalBatchBySize[size] = d
        return d
    }
}
