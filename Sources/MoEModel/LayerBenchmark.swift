import Foundation
import MoECheckpoint
import MoECompute

/// Bench cases that need the model: a whole top-k MoE layer (forward + backward)
/// with the share of its time outside the expert GEMMs, and a training step of
/// a ViT with tokens/s and MFU. `moe-gpu bench` registers them.
public enum LayerBenchmark {
    /// A top-k MoE layer (linear router, softmax-then-top-k renormalised, dropless,
    /// load-balancing and z-losses, GELU experts) on `tokens x width` random rows:
    /// forward then backward, timed together with (interleaved, same buffers)
    /// - `experts`: the expert bank alone (grouped GEMMs, bias, GELU and their
    ///   backward) on the same dispatch plan, and
    /// - `routing_ops`: the layer's other ops alone, in the order the layer runs
    ///   them: router GEMM, gate, dispatch plan, permute, combine, combine
    ///   backward, load-balancing loss, gate backward, z-loss, unpermute, the
    ///   residual axpy and the router backward.
    /// Derived: `outside_experts_share = 1 - experts / layer` and
    /// `routing_ops_share = routing_ops / layer`.
    /// FLOPs are those of the GEMMs: 12 R H I for the experts (R = T k rows) plus
    /// 6 T H E for the router.
    public static func moeLayer(tokens t: Int, width h: Int, hidden i: Int, experts e: Int, k: Int, label: String? = nil) -> BenchCase {
        BenchCase(kernel: "moe-layer", shape: label ?? "T=\(t) H=\(h) I=\(i) E=\(e) k=\(k) fwd+bwd") { backend in
            let store = ParameterStore(backend: backend, seed: 1)
            let gate = GateConfig(k: k, mode: .softmaxThenTopK, renormalize: true)
            let dispatch = DispatchConfig(experts: e)
            let layer = try MoELayer(store, "moe", width: h, hidden: i, experts: e, routing: .topK(gate: gate, dispatch: dispatch),
                                     auxCoefficient: 0.01, zCoefficient: 0.001, experts: .mlp(.geluErf), dropout: 0)
            let x = try backend.tensor(randomValues(t * h, seed: 101), shape: [t, h])
            let dOut = try backend.tensor(randomValues(t * h, seed: 102), shape: [t, h])
            let out = try backend.zeros([t, h]), dX = try backend.zeros([t, h])
            let full = {
                try layer.forward(x, batch: 1, tokens: t, into: out, training: true, step: 1)
                try layer.backward(dOut: dOut, x: x, batch: 1, tokens: t, dX: dX, lossScale: 1)
            }

            // The same routing, made once, for the experts-only companion.
            let logits = try backend.zeros([t, e])
            try layer.router.forward(x, rows: t, into: logits)
            let g = try backend.gate(logits: logits, config: gate)
            let plan = try backend.dispatchPlan(expertIndex: g.expertIndex, gateWeight: g.gateWeight, config: dispatch)
            let rows = max(plan.maxRows, 1)
            let xp = try backend.zeros([rows, h]), yp = try backend.zeros([rows, h]), dXp = try backend.zeros([rows, h])
            let dYp = try backend.tensor(randomValues(rows * h, seed: 103), shape: [rows, h])
            try backend.permute(x, plan: plan, into: xp)
            let expertsOnly = {
                try layer.experts.forward(xp, offsets: plan.offsets, rows: rows, into: yp, training: true, seed: 1)
                try layer.experts.backward(dYp: dYp, xp: xp, offsets: plan.offsets, rows: rows, dXp: dXp)
            }

            // The routing, permute and combine ops alone, on their own buffers.
            let idx = try backend.zeros([t, k], dtype: .i32), w = try backend.zeros([t, k]), probs = try backend.zeros([t, e])
            let rxp = try backend.zeros([rows, h]), rout = try backend.zeros([t, h]), rdYp = try backend.zeros([rows, h])
            let rdW = try backend.zeros([t, k]), dProbs = try backend.zeros([t, e]), dLogits = try backend.zeros([t, e])
            let aux = try backend.zeros([1]), z = try backend.zeros([1]), dTokens = try backend.zeros([t, h]), rdX = try backend.zeros([t, h])
            let routingOps = {
                try layer.router.forward(x, rows: t, into: logits)
                try backend.gate(logits: logits, config: gate, expertIndex: idx, gateWeight: w, probs: probs)
                let p = try DispatchPlan.topK(on: backend, tokens: t, k: k, config: dispatch)
                try backend.dispatchPlan(expertIndex: idx, gateWeight: w, config: dispatch, into: p)
                try backend.permute(x, plan: p, into: rxp)
                try backend.combine(yp, weights: w, plan: p, into: rout)
                try backend.combineBackward(dOut: dOut, yp: yp, weights: w, plan: p, dYp: rdYp, dWeights: rdW)
                try backend.loadBalancingLoss(probs: probs, expertIndex: idx, coefficient: 0.01, loss: aux, dProbs: dProbs)
                try backend.gateBackward(config: gate, expertIndex: idx, gateWeight: w, probs: probs, dGateWeight: rdW,
                                         dProbs: dProbs, dLogits: dLogits)
                try backend.zLoss(logits: logits, coefficient: 0.001, loss: z, dLogits: dLogits, accumulate: true)
                try backend.unpermute(dXp, plan: p, into: dTokens)
                try backend.axpy(1, dTokens, rdX)
                try layer.router.backward(dY: dLogits, x: x, rows: t, dX: rdX, accumulateDX: true)
            }
            let r = Double(t * k)
            let flops = 12 * r * Double(h) * Double(i) + 6 * Double(t) * Double(h) * Double(e)
            return BenchWork(run: full, flops: flops,
                             companions: [("experts", expertsOnly), ("routing_ops", routingOps)],
                             extra: ["expert_gemm_gflop": 12 * r * Double(h) * Double(i) / 1e9],
                             derive: { layerTime, c in
                                 var d: [String: Double] = [:]
                                 if let ex = c["experts"] { d["outside_experts_share"] = 1 - ex / layerTime }
                                 if let ro = c["routing_ops"] { d["routing_ops_share"] = ro / layerTime }
                                 return d
                             })
        }
    }

    /// One `Trainer.trainStep` (forward, loss, backward, clipping, AdamW) of the
    /// ViT `config.model` on Fashion-MNIST (synthetic images when it is not
    /// installed, or when `synthetic`: 1024 seeded random images, for quick
    /// runs). FLOPs = 6 x active parameters x tokens per step, so the rate is the
    /// model FLOP rate; `mfu` is it over the device's measured FMA peak.
    public static func trainStep(config: TrainConfig, label: String, synthetic: Bool = false) -> BenchCase {
        BenchCase(kernel: "train-step", shape: label) { backend in
            let data = try trainingData(config.model, synthetic: synthetic)
            let model = try ViT(config: config.model, backend: backend, seed: config.seed)
            let trainer = try Trainer(config: config, model: model, train: data.train, test: data.test)
            return try stepWork(trainer, backend: backend, extra: ["fashion_mnist": data.real ? 1 : 0])
        }
    }

    static func trainingData(_ m: ViTConfig, synthetic: Bool) throws -> (train: ImageDataset, test: ImageDataset, real: Bool) {
        let folder = BuiltinData.fashionMNISTFolder
        if !synthetic, m.channels == 1 && m.imageSize == 28,
           FileManager.default.fileExists(atPath: folder + "/train-images-idx3-ubyte.gz"),
           let d = try? BuiltinData.idxFolder(folder) {
            return (d.train, d.test, true)
        }
        var rng = SplitMix64(seed: 7)
        let n = 1024, pixels = m.channels * m.imageSize * m.imageSize
        let images = (0..<(n * pixels)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        let labels = (0..<n).map { _ in Int32(rng.next() % UInt64(m.classes)) }
        let d = try ImageDataset(images: images, labels: labels, channels: m.channels, height: m.imageSize, width: m.imageSize,
                                 classes: m.classes)
        return (d, d, false)
    }

    /// Parameters a token uses: every parameter, except that each expert bank
    /// counts by the share of a token's rows its experts see: k / E for top-k,
    /// capacity / T for expert choice, slots per expert / tokens per image for
    /// Soft MoE and SpheroMoE.
    public static func activeParameters(_ model: ViT) -> Double {
        var active = Double(model.params.parameterCount)
        func bankCount(_ b: ExpertBank) -> Double { Double([b.w1, b.b1, b.w2, b.b2].compactMap { $0?.globalCount }.reduce(0, +)) }
        let tokens = model.config.tokens
        for block in model.blocks {
            if let moe = block.ffn as? MoELayer {
                let bank = bankCount(moe.experts), e = Double(moe.experts.totalExperts)
                let share: Double
                switch moe.routing {
                case .topK(let gate, _): share = Double(gate.k) / e
                case .expertChoice(let factor):
                    share = Double(ExpertChoice.capacity(tokens: tokens, experts: moe.experts.totalExperts, factor: factor)) / Double(tokens)
                }
                active -= bank * (1 - share)
            } else if let soft = block.ffn as? SoftMoELayer {
                let share = Double(soft.slotsPerExpert) / Double(tokens)
                for bank in [soft.core, soft.universal].compactMap({ $0 }) { active -= bankCount(bank) * (1 - share) }
            }
        }
        return active
    }
}

extension LayerBenchmark {
    /// One training step of a decoder LM on seeded random token windows: the
    /// model `config.lm`, or the checkpoint at `checkpoint` (GGUF, Hugging Face
    /// folder) upcycled at load into `config.lm`'s MoE layout when it has one.
    /// FLOPs = 6 x active parameters x tokens (attention's score FLOPs not
    /// counted, as MFU usually states it).
    public static func lmTrainStep(config: TrainConfig, checkpoint: String? = nil, upcycle: LMUpcycleMethod = .replicate,
                                   label: String) -> BenchCase {
        BenchCase(kernel: "lm-train-step", shape: label) { backend in
            var cfg = config
            var source: TensorSource?
            if let checkpoint {
                let (s, stored) = try LlamaCheckpoint.open(checkpoint)
                var lm = stored
                lm.moe = config.lm?.moe
                lm.moeLayers = config.lm?.moe == nil ? [] : Array(0..<lm.layers)
                cfg.lm = lm
                source = s
            }
            cfg.evalEvery = 0
            let lm = cfg.lm!
            let model = try LlamaModel(config: lm, backend: backend, seed: cfg.seed, sequenceLength: cfg.seqLen, initialize: source == nil)
            if let source {
                try LlamaCheckpoint.load(source, into: model, upcycle: lm.moeLayers.isEmpty ? nil : LMUpcycleOptions(method: upcycle))
            }
            var rng = SplitMix64(seed: 3)
            let windows = cfg.batchSize * 8
            let ids = (0..<(windows * cfg.seqLen + 1)).map { _ in Int32(rng.next() % UInt64(lm.vocabSize)) }
            let corpus = try TokenizedCorpus(tokens: ids, padID: 0)
            let data = try LMBatchSource(corpus, seqLen: cfg.seqLen)
            let trainer = try Trainer(config: cfg, model: model, train: data, test: data)
            return try stepWork(trainer, backend: backend)
        }
    }
}

extension LayerBenchmark {
    /// A training step as bench work: FLOPs = 6 x active parameters x tokens per
    /// step, with the launch profile of a warm step (the first sizes the workspaces).
    static func stepWork(_ trainer: Trainer, backend: Backend, extra: [String: Double] = [:]) throws -> BenchWork {
        let model = trainer.model, c = trainer.config
        let tokens = Double(c.batchSize * c.gradientAccumulation * model.tokensPerExample)
        let active = model.activeParameterCount
        _ = try trainer.trainStep()
        let before = backend.counters.snapshot
        _ = try trainer.trainStep()
        let profile = backend.counters.snapshot.since(before)
        var figures: [String: Double] = ["active_params": active, "total_params": Double(model.params.parameterCount),
                                         "tokens_per_step": tokens, "launches_per_step": Double(profile.launches),
                                         "host_syncs_per_step": Double(profile.hostSyncs),
                                         "allocations_per_step": Double(profile.allocations)]
        figures.merge(extra) { $1 }
        return BenchWork(run: { _ = try trainer.trainStep() }, flops: 6 * active * tokens, extra: figures,
                         derive: { t, _ in ["tokens_per_s": tokens / t] }, reportsMFU: true)
    }
}
