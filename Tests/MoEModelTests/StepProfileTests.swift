import Foundation
import MoECompute
@testable import MoEModel
import XCTest
import MoETestSupport

/// Seeded random 8x8 images for the tiny models (no data package needed).
func syntheticImages(count: Int, side: Int = 8, classes: Int = 3, seed: UInt64) throws -> ImageDataset {
    var rng = SplitMix64(seed: seed)
    let images = (0..<(count * side * side)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    let labels = (0..<count).map { _ in Int32(rng.next() % UInt64(classes)) }
    return try ImageDataset(images: images, labels: labels, channels: 1, height: side, width: side, classes: classes)
}

/// The launch profile of a training step, from the backend's counters: no
/// allocation after the first step (or the first evaluation), one host sync
/// per step, and a launch count that does not grow with the batch (attention
/// is one op per layer, not per image and head).
final class StepProfileTests: XCTestCase {
    static let routers: [String?] = [nil, "topk", "expert-choice", "soft", "sphero"]

    func tinyTrainConfig(router: String?, batch: Int, pool: String = "cls") -> TrainConfig {
        var c = TrainConfig()
        c.model = tinyConfig(router: router)
        c.model.pool = pool
        c.batchSize = batch; c.steps = 10; c.warmupSteps = 1; c.evalEvery = 0
        c.augment = true   // the augmented path must not allocate either
        return c
    }

    struct Profile { var launches: Int; var syncs: Int; var allocations: Int }

    /// The backend's counters over one more step of `trainer`.
    func nextStep(_ trainer: Trainer, on backend: Backend) throws -> DeviceCounters.Snapshot {
        let before = backend.counters.snapshot
        _ = try trainer.trainStep()
        return backend.counters.snapshot.since(before)
    }

    /// Steps 2 and 3 of a fresh run (step 1 sizes the workspaces), then two evaluations.
    func profile(_ c: TrainConfig, on backend: Backend, file: StaticString = #filePath, line: UInt = #line) throws -> Profile {
        let data = try syntheticImages(count: 64, seed: 5)
        let model = try ViT(config: c.model, backend: backend, seed: 3)
        let trainer = try Trainer(config: c, model: model, train: data, test: data)
        _ = try trainer.trainStep()
        let one = try nextStep(trainer, on: backend), two = try nextStep(trainer, on: backend)
        let what = "\(c.model.moe?.router ?? "dense") batch \(c.batchSize)"
        XCTAssertEqual(one.allocations, 0, "\(what): step 2 allocated \(one.allocatedBytes) bytes", file: file, line: line)
        XCTAssertEqual(two.allocations, 0, "\(what): step 3 allocated", file: file, line: line)
        XCTAssertEqual(one.hostSyncs, 1, "\(what): host syncs in step 2", file: file, line: line)
        XCTAssertEqual(two.hostSyncs, 1, "\(what): host syncs in step 3", file: file, line: line)
        XCTAssertEqual(one.launches, two.launches, "\(what): launches differ between steps", file: file, line: line)
        _ = try trainer.evaluate(limit: 40)
        let evalStart = backend.counters.snapshot
        _ = try trainer.evaluate(limit: 40)
        XCTAssertEqual(backend.counters.snapshot.since(evalStart).allocations, 0, "\(what): the second evaluation allocated",
                       file: file, line: line)
        return Profile(launches: one.launches, syncs: one.hostSyncs, allocations: one.allocations)
    }

    func checkEveryRouter(on backend: Backend) throws {
        for router in Self.routers {
            for pool in ["cls", "mean"] {
                let small = try profile(tinyTrainConfig(router: router, batch: 4, pool: pool), on: backend)
                let large = try profile(tinyTrainConfig(router: router, batch: 16, pool: pool), on: backend)
                XCTAssertEqual(small.launches, large.launches,
                               "\(router ?? "dense") \(pool): launches per step grow with the batch (\(small.launches) at 4, \(large.launches) at 16)")
            }
        }
    }

    func testStepProfileOnCPU() throws { try checkEveryRouter(on: CPUBackend()) }
    func testStepProfileOpenCL() throws { try checkEveryRouter(on: try TestBackends.openCLOrSkip()) }

    /// The default recipe's model (SpheroMoE in blocks 2-3, batch 64) stays under
    /// 400 launches per step on an OpenCL device.
    func testDefaultModelLaunchesOpenCL() throws {
        let backend = try TestBackends.openCLOrSkip()
        var c = Recipe.defaultFineTune()
        c.steps = 10
        let data = try syntheticImages(count: 256, side: 28, classes: 10, seed: 6)
        let model = try ViT(config: c.model, backend: backend, seed: 1)
        let trainer = try Trainer(config: c, model: model, train: data, test: data)
        _ = try trainer.trainStep()
        let step = try nextStep(trainer, on: backend)
        XCTAssertLessThan(step.launches, 400, "default model: \(step.launches) launches per step")
        XCTAssertEqual(step.hostSyncs, 1)
        XCTAssertEqual(step.allocations, 0)
    }

    /// Workspaces are per shape: an evaluation (another batch size) between
    /// steps leaves the training run exactly as it was, for every router.
    func testEvaluationBetweenStepsChangesNothing() throws {
        for router in Self.routers {
            let c = tinyTrainConfig(router: router, batch: 6)
            let data = try syntheticImages(count: 64, seed: 5)
            var curves: [[Float]] = []
            for evaluateBetween in [false, true] {
                let model = try ViT(config: c.model, backend: CPUBackend(), seed: 3)
                let trainer = try Trainer(config: c, model: model, train: data, test: data)
                var losses: [Float] = []
                for step in 1...4 {
                    losses.append(try trainer.trainStep().loss)
                    if evaluateBetween && step == 2 { _ = try trainer.evaluate(limit: 50) }
                }
                curves.append(losses)
            }
            XCTAssertEqual(curves[0], curves[1], "\(router ?? "dense"): an evaluation changed the training curve")
        }
    }

    /// A step whose loss turns NaN throws `TrainError.nonFinite` after its one
    /// host read, and AdamW (guarded on the device by the gradient norm) has
    /// changed neither the parameters nor the moments.
    func checkNaNStepChangesNothing(on backend: Backend) throws {
        let c = tinyTrainConfig(router: "topk", batch: 4)
        let data = try syntheticImages(count: 32, seed: 5)
        let model = try ViT(config: c.model, backend: backend, seed: 3)
        let trainer = try Trainer(config: c, model: model, train: data, test: data)
        _ = try trainer.trainStep()
        // Poison the head bias: every logit, the loss and every gradient become NaN.
        let bias = model.params["head.bias"]!
        try bias.value.write([Float](repeating: .nan, count: bias.count))
        let values = try model.params.values!.floats()
        let (m, v) = try trainer.optimizer.moments()
        let (m0, v0) = (try m.floats(), try v.floats())
        XCTAssertThrowsError(try trainer.trainStep()) { error in
            guard case TrainError.nonFinite(let step, _, _) = error else { return XCTFail("unexpected error \(error)") }
            XCTAssertEqual(step, 2)
        }
        let after = try model.params.values!.floats()
        XCTAssertTrue(zip(values, after).allSatisfy { $0.bitPattern == $1.bitPattern }, "parameters changed in the NaN step")
        XCTAssertEqual(try m.floats(), m0, "first moments changed in the NaN step")
        XCTAssertEqual(try v.floats(), v0, "second moments changed in the NaN step")
    }

    func testNaNStepChangesNothingOnCPU() throws { try checkNaNStepChangesNothing(on: CPUBackend()) }
    func testNaNStepChangesNothingOpenCL() throws { try checkNaNStepChangesNothing(on: try TestBackends.openCLOrSkip()) }

    /// An inference-only model has no gradient buffer and no optimiser state.
    func testInferenceModelAllocatesNoGradients() throws {
        let backend = CPUBackend()
        let c = tinyConfig(router: "topk")
        let start = backend.counters.snapshot
        let model = try ViT(config: c, backend: backend, seed: 1, training: false)
        let bytes = backend.counters.snapshot.since(start).allocatedBytes
        XCTAssertNil(model.params.gradients)
        XCTAssertTrue(model.params.all.allSatisfy { $0.grad == nil })
        // Values are allocated twice at most (per-parameter at creation, then the flat buffer).
        XCTAssertLessThanOrEqual(bytes, 2 * 4 * model.params.parameterCount + 1024)
        let trained = try ViT(config: c, backend: backend, seed: 1)
        let state = OptimizerState(store: trained.params)
        XCTAssertNil(state.m, "moments exist before the first optimiser step")
        _ = try state.moments()
        XCTAssertEqual(state.m?.count, trained.params.trainableCount)
    }

    /// Frozen parameters live after the trainable ones, with no gradient and no
    /// optimiser state; AdamW leaves them alone.
    func testFrozenParametersHaveNoGradient() throws {
        let backend = CPUBackend()
        let store = ParameterStore(backend: backend, seed: 1)
        let frozen = try store.make("embed", [4, 3], .normal(std: 1), decays: true, trainable: false)
        let w = try store.make("w", [3, 2], .normal(std: 1), decays: true)
        let bias = try store.make("b", [2], .zeros, decays: false)
        try store.finalize()
        XCTAssertNil(frozen.grad)
        XCTAssertEqual(store.trainableCount, 8)
        XCTAssertEqual(store.ranges, [ParameterRange(name: ParameterStore.denseRange, offset: 0, count: 8, decayed: 6)])
        XCTAssertEqual(frozen.offset, 8)
        XCTAssertEqual(store.gradients?.count, 8)
        let before = try frozen.value.floats()
        try w.grad!.write([Float](repeating: 1, count: 6)); try bias.grad!.write([Float](repeating: 1, count: 2))
        let state = OptimizerState(store: store)
        try state.step(config: AdamWConfig(learningRate: 0.1), weightDecay: 0.1, step: 1, guardNorm: nil)
        XCTAssertEqual(try frozen.value.floats(), before)
        XCTAssertThrowsError(try state.moments(of: frozen))
        XCTAssertNotEqual(try w.value.floats().first, 0)
    }

    /// ZeRO-1: ranks' shards cut the trainable elements (and, apart, the frozen
    /// ones) at parameter boundaries, and AdamW run shard by shard, each with
    /// only its moments, updates every parameter exactly as one full step does,
    /// including shards that start inside a range's decayed or non-decayed part.
    func testShardedOptimizerEqualsTheFullStep() throws {
        func build() throws -> ParameterStore {
            let store = ParameterStore(backend: CPUBackend(), seed: 5)
            _ = try store.make("embed", [40, 3], .normal(std: 1), decays: false, trainable: false)
            for (i, n) in [7, 1, 12, 5, 3].enumerated() { _ = try store.make("w\(i)", [n, 2], .normal(std: 1), decays: true) }
            for (i, n) in [4, 9].enumerated() { _ = try store.make("b\(i)", [n], .normal(std: 1), decays: false) }
            _ = try store.make("expert.w", [6, 2], .normal(std: 1), decays: true, range: "moe")
            _ = try store.make("expert.b", [3], .normal(std: 1), decays: false, range: "moe")
            try store.finalize()
            try store.gradients!.write((0..<store.trainableCount).map { Float(($0 * 37) % 11) / 5 - 1 })
            return store
        }
        let full = try build()
        let config = AdamWConfig(learningRate: 0.05)
        let fullState = OptimizerState(store: full)
        for s in 1...2 { try fullState.step(config: config, weightDecay: 0.1, step: s, guardNorm: nil) }
        for parts in [1, 2, 3, 5, 16] {
            let store = try build()
            let owned = store.partition(parts)
            // Every parameter has one owner; owners follow the flat buffer in order, trainable and frozen apart.
            for trainable in [true, false] {
                let owners = store.all.filter { $0.trainable == trainable }.sorted { $0.offset < $1.offset }.compactMap { owned.owner(of: $0) }
                XCTAssertEqual(owners.count, store.all.filter { $0.trainable == trainable }.count)
                XCTAssertEqual(owners, owners.sorted(), "\(parts) parts")
                // With 40% of the buffer frozen, 2 ranks still split the trainable work.
                if parts == 2 && trainable { XCTAssertEqual(Set(owners), [0, 1], "\(parts) parts") }
            }
            let states = (0..<parts).map { OptimizerState(store: store, shard: owned.optimizerShard(of: $0)) }
            for s in 1...2 { for state in states { try state.step(config: config, weightDecay: 0.1, step: s, guardNorm: nil) } }
            XCTAssertEqual(try store.values!.floats(), try full.values!.floats(), "\(parts) shards")
            XCTAssertEqual(states.map(\.count).reduce(0, +), store.trainableCount, "every moment lives on exactly one rank")
            for p in store.all where p.trainable { XCTAssertEqual(states.filter { $0.holds(p) }.count, 1, p.name) }
        }
    }

    /// Flat buffers: the non-expert parameters and each MoE layer's experts are
    /// separate contiguous ranges, decayed parameters first inside each range.
    func testParameterRangesAreContiguous() throws {
        var c = tinyConfig(router: "sphero")
        c.depth = 3; c.moeBlocks = [1, 2]
        let model = try ViT(config: c, backend: CPUBackend(), seed: 1)
        let store = model.params
        XCTAssertEqual(store.ranges.map(\.name), [ParameterStore.denseRange, "blocks.1.moe", "blocks.2.moe"])
        var next = 0
        for r in store.ranges {
            XCTAssertEqual(r.offset, next)
            next += r.count
            let members = store.all.filter { $0.range == r.name }
            XCTAssertEqual(members.reduce(0) { $0 + $1.count }, r.count)
            for p in members {
                XCTAssertTrue((r.offset..<(r.offset + r.count)).contains(p.offset))
                XCTAssertEqual(p.decays, p.offset < r.offset + r.decayed, "\(p.name) on the wrong side of the decay boundary")
            }
            if r.name != ParameterStore.denseRange { XCTAssertTrue(members.allSatisfy { $0.name.contains("experts") }) }
        }
        XCTAssertEqual(next, store.trainableCount)
        // Values written through a parameter land in the flat buffer.
        let p = store.all[3]
        try p.value.write([Float](repeating: 7, count: p.count))
        let flat = try store.values!.floats()
        XCTAssertEqual(Array(flat[p.offset..<(p.offset + p.count)]), [Float](repeating: 7, count: p.count))
    }
}

/// Gradient accumulation: N micro-batches give the mean of their gradients,
/// auxiliary losses included (their gradients were not divided by N before).
final class GradientAccumulationTests: XCTestCase {
    /// Serves examples by index and records which ones each call asked for.
    final class RecordingSource: BatchSource {
        let inner: ImageBatchSource
        var requests: [[Int]] = []
        init(_ data: ImageDataset, model: ViTConfig) { inner = ImageBatchSource(data, model: model, augment: false) }
        var count: Int { inner.count }
        var inputType: DType { inner.inputType }
        func inputShape(batch: Int) -> [Int] { inner.inputShape(batch: batch) }
        func labelCount(batch: Int) -> Int { inner.labelCount(batch: batch) }
        func fill(indices: [Int], augmentSeed: UInt64?, inputs: UnsafeMutableRawBufferPointer, labels: UnsafeMutableBufferPointer<Int32>) {
            requests.append(indices)
            inner.fill(indices: indices, augmentSeed: augmentSeed, inputs: inputs, labels: labels)
        }
    }

    /// The gradient of examples `indices` (weight 1 on every loss), on a copy of `model`'s weights.
    func gradient(of indices: [Int], config c: TrainConfig, weights: ViT, source: RecordingSource) throws -> [Float] {
        let b = weights.backend
        let model = try ViT(config: c.model, backend: b, seed: 9)
        try b.copy(weights.params.values!, to: model.params.values!)
        let n = indices.count
        let inputs = try b.zeros(source.inputShape(batch: n)), labels = try b.zeros([n], dtype: .i32)
        var hostIn = [Float](repeating: 0, count: inputs.count), hostLabels = [Int32](repeating: 0, count: n)
        hostIn.withUnsafeMutableBytes { i in hostLabels.withUnsafeMutableBufferPointer { source.inner.fill(indices: indices, augmentSeed: nil, inputs: i, labels: $0) } }
        try inputs.write(hostIn); try labels.write(hostLabels)
        try model.params.zeroGradients()
        let logits = try model.forward(inputs, training: true, step: 1)
        let dLogits = try b.zeros(logits.shape)
        try b.crossEntropy(logits: logits, labels: labels, labelSmoothing: c.labelSmoothing, rowLoss: try b.zeros([n]),
                           meanLoss: try b.zeros([1]), dLogits: dLogits, gradientScale: 1)
        try model.backward(dLogits: dLogits, inputs: inputs, lossScale: 1)
        return try model.params.gradients!.floats()
    }

    func check(router: String, auxLoss: Float, againstOneBigBatch: Bool) throws {
        var c = TrainConfig()
        c.model = tinyConfig(router: router)
        c.model.moe?.auxLossCoefficient = auxLoss
        c.model.moe?.zLossCoefficient = 0.01
        c.batchSize = 6; c.gradientAccumulation = 2; c.steps = 1; c.clipNorm = 0; c.augment = false
        let data = try syntheticImages(count: 40, seed: 8)
        let source = RecordingSource(data, model: c.model)
        let backend = CPUBackend()
        let model = try ViT(config: c.model, backend: backend, seed: 9)
        let start = try ViT(config: c.model, backend: backend, seed: 9)   // the weights before the step
        let trainer = try Trainer(config: c, model: model, train: source, test: source)
        _ = try trainer.trainStep()
        let accumulated = try model.params.gradients!.floats()
        XCTAssertEqual(source.requests.count, 2)
        let g1 = try gradient(of: source.requests[0], config: c, weights: start, source: source)
        let g2 = try gradient(of: source.requests[1], config: c, weights: start, source: source)
        let mean = zip(g1, g2).map { (Double($0) + Double($1)) / 2 }
        assertRelativeError(accumulated, mean, below: 1e-5, "\(router): accumulated vs mean of micro-batch gradients")
        if againstOneBigBatch {
            let big = try gradient(of: source.requests[0] + source.requests[1], config: c, weights: start, source: source)
            assertRelativeError(accumulated, big.map(Double.init), below: 1e-5, "\(router): accumulated vs one batch of twice the size")
        }
    }

    func testTopKWithLoadBalancingLoss() throws { try check(router: "topk", auxLoss: 0.5, againstOneBigBatch: false) }
    /// Without the load-balancing loss (not linear in the batch), dropless top-k is
    /// linear in the examples: accumulation equals one batch of twice the size.
    func testTopKEqualsOneBatchOfTwiceTheSize() throws { try check(router: "topk", auxLoss: 0, againstOneBigBatch: true) }
}
