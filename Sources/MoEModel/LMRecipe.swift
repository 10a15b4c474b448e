import Foundation
import MoECheckpoint
import MoECompute
import MoETokenizer

/// The built-in language-model recipe (`moe-gpu train --task lm`) and what every
/// language-model command shares: tokenizers, text sources, the dense model cache.
public enum LMRecipe {
    /// A small byte-level Llama for Shakespeare: 4 layers of width 128, 4 query
    /// heads sharing 2 kv heads, SwiGLU MLPs of 384, tied embeddings.
    public static func denseModel() -> LMConfig {
        var c = LMConfig()
        c.vocabSize = ByteTokenizer().vocabularySize
        c.hidden = 128; c.intermediate = 384; c.layers = 4; c.heads = 4; c.kvHeads = 2
        c.ropeTheta = 10000; c.maxPositions = 512; c.tieEmbeddings = true
        c.bosID = ByteTokenizer.bos; c.eosID = ByteTokenizer.eos; c.padID = ByteTokenizer.pad
        c.tokenizer = "byte"
        return c
    }

    /// Mixtral routing as Llama 3 Meets MoE uses it: top-2 of 8, softmax then top-k renormalised, dropless.
    public static func mixtralMoE(experts: Int = 8, topK: Int = 2) -> MoEConfig {
        var m = MoEConfig()
        m.router = "topk"; m.experts = experts; m.topK = topK
        m.gateOrder = "softmax-topk"; m.renormalize = true; m.capacityFactor = nil
        m.auxLossCoefficient = 0.01; m.zLossCoefficient = 0.001; m.expertWidthRatio = 1
        return m
    }

    /// The default run: the dense model upcycled into 8 experts top-2 in every layer, trained 300 more steps.
    public static func defaultFineTune() -> TrainConfig {
        var t = TrainConfig()
        t.task = "lm"
        var lm = denseModel()
        lm.moe = mixtralMoE()
        lm.moeLayers = Array(0..<lm.layers)
        t.lm = lm
        t.seqLen = 128
        t.batchSize = 16
        t.steps = 300
        t.learningRate = 1e-3
        t.minLearningRate = 1e-4
        t.warmupSteps = 20
        t.weightDecay = 0.1
        t.beta2 = 0.95
        t.labelSmoothing = 0
        t.augment = false
        t.evalEvery = 100
        t.logEvery = 10
        t.testExamples = 256
        return t
    }

    /// The dense pretraining run the default starts from.
    public static func densePretrain(like c: TrainConfig, steps: Int?) -> TrainConfig {
        var d = c
        d.lm?.moe = nil
        d.lm?.moeLayers = []
        // One dense checkpoint for every seed of the continued runs (the experiment compares from the same start).
        d.seed = 0
        d.steps = steps ?? 800
        d.learningRate = 3e-3
        d.minLearningRate = 1e-4
        d.warmupSteps = 50
        d.evalEvery = 0
        d.testExamples = 256
        d.logEvery = TrainConfig().logEvery
        return d
    }

    /// The tokenizer a model config names: "byte", a GGUF file, a tokenizer.json or
    /// a folder holding one; with the identity the token cache is keyed by.
    public static func tokenizer(_ spec: String) throws -> (tokenizer: Tokenizer, identity: String) {
        if spec == "byte" { return (ByteTokenizer(), "bytes") }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: spec, isDirectory: &isDir) else {
            throw ModelError.badInput("tokenizer \(spec) does not exist: give a GGUF file, a tokenizer.json or the model folder")
        }
        let file = isDir.boolValue ? (spec as NSString).appendingPathComponent("tokenizer.json") : spec
        let tok: Tokenizer
        if file.hasSuffix(".json") {
            guard FileManager.default.fileExists(atPath: file) else {
                throw ModelError.badInput("\(spec) has no tokenizer.json: put the model's tokenizer.json in the folder")
            }
            tok = try ByteLevelBPETokenizer(tokenizerJSON: file)
        } else {
            tok = try ByteLevelBPETokenizer(gguf: file)
        }
        let size = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? Int) ?? 0
        return (tok, "bpe:\((file as NSString).lastPathComponent):\(size)")
    }

    /// Training and validation windows: the Shakespeare split by default, else
    /// `data` with `evalData` (or the last 5% of `data`'s tokens when there is none).
    public static func sources(train data: String?, validation evalData: String?, tokenizer spec: String, seqLen: Int,
                               log: (String) -> Void = { print($0) }) throws -> (train: LMBatchSource, test: LMBatchSource) {
        let (tok, identity) = try tokenizer(spec)
        let trainPaths: [String], validationPaths: [String]?
        if let data {
            trainPaths = [data]
            validationPaths = evalData.map { [$0] }
        } else {
            let split = try ShakespeareCorpus.split()
            trainPaths = split.train
            validationPaths = evalData.map { [$0] } ?? split.validation
        }
        var train = try TokenizedCorpus.load(paths: trainPaths, tokenizer: tok, identity: identity)
        let validation: TokenizedCorpus
        if let validationPaths {
            validation = try TokenizedCorpus.load(paths: validationPaths, tokenizer: tok, identity: identity)
        } else {
            // Hold out the tail, cut at a window boundary.
            let cut = max(seqLen + 1, (train.tokens.count * 19 / 20) / seqLen * seqLen)
            guard cut + 2 <= train.tokens.count else {
                throw ModelError.badInput("\(data ?? "the corpus") has \(train.tokens.count) tokens: too few to hold out validation text; give --eval-data")
            }
            validation = try TokenizedCorpus(tokens: Array(train.tokens[cut...]), lossMask: train.lossMask.map { Array($0[cut...]) }, padID: train.padID)
            train = try TokenizedCorpus(tokens: Array(train.tokens[..<(cut + 1)]), lossMask: train.lossMask.map { Array($0[...cut]) }, padID: train.padID)
        }
        log("data: \(train.tokens.count) training tokens, \(validation.tokens.count) validation tokens (\(identity == "bytes" ? "byte tokenizer" : identity))")
        return (try LMBatchSource(train, seqLen: seqLen), try LMBatchSource(validation, seqLen: seqLen))
    }

    public static var cacheDirectory: URL { Recipe.cacheDirectory }

    /// The pretrained dense model for `c` as a checkpoint file, from the cache when
    /// an earlier run trained the same config, else trained now. Returns the file
    /// and the model's validation loss.
    public static func pretrainedDense(for c: TrainConfig, steps: Int?, backend: Backend,
                                       data: (train: LMBatchSource, test: LMBatchSource),
                                       log: @escaping (String) -> Void = { print($0) }) throws -> (file: String, evalLoss: Double) {
        let d = densePretrain(like: c, steps: steps)
        let dir = try Recipe.cacheFolder("lm-dense", for: d)
        let model = try LlamaModel(config: d.lm!, backend: backend, seed: d.seed, sequenceLength: d.seqLen)
        let trainer = try Trainer(config: d, model: model, train: data.train, test: data.test)
        if let file = TrainRun.modelFile(in: dir),
           (try? LlamaCheckpoint.load(try openCheckpoint(path: file.path), into: model)) != nil {
            let loss = try trainer.evaluateWithLoss(limit: d.testExamples).loss   // as the pretraining run evaluated it
            log(String(format: "dense: reusing the pretrained Llama in %@ (validation loss %.4f)", dir.path, loss))
            return (file.path, loss)
        }
        TrainRun.clearRun(dir)
        log("dense: pretraining a \(model.params.parameterCount)-parameter Llama for \(d.steps) steps (cached in \(dir.path) for later runs)")
        let run = try TrainRun(config: d, trainer: trainer, out: dir)
        run.progress = { m, total in
            if m.step % 100 == 0 || m.step == total {
                log(String(format: "dense step %d/%d  loss %.4f  %.0f tok/s", m.step, total, m.loss, m.tokensPerSecond))
            }
        }
        _ = try run.run()
        let loss = run.evalLoss ?? .nan
        log(String(format: "dense: validation loss %.4f (perplexity %.2f)", loss, exp(loss)))
        guard let file = TrainRun.modelFile(in: dir) else { throw ModelError.io("the dense pretraining in \(dir.path) left no model") }
        return (file.path, loss)
    }
}

extension LMRecipe {
    /// MoE Jetpack's neuron importance for recycling: per dense MLP layer, the L2
    /// norm over the tokens of `windows` of each hidden neuron's SwiGLU activation,
    /// from an inference-only copy of the dense model (freed on return).
    public static func neuronImportance(source: TensorSource, dense config: LMConfig, windows: LMBatchSource, count: Int,
                                        backend: Backend, batch: Int = 8) throws -> [Int: [Double]] {
        var c = config
        c.moe = nil; c.moeLayers = []
        let model = try LlamaModel(config: c, backend: backend, seed: 0, sequenceLength: windows.seqLen, training: false, initialize: false)
        try LlamaCheckpoint.load(source, into: model)
        var sums: [Int: [Double]] = [:]
        var start = 0
        let n = min(count, windows.count)
        while start < n {
            let m = min(batch, n - start)
            var ids = [Int32](repeating: 0, count: m * windows.seqLen), labels = ids
            ids.withUnsafeMutableBytes { i in labels.withUnsafeMutableBufferPointer { windows.fill(indices: Array(start..<(start + m)), augmentSeed: nil, inputs: i, labels: $0) } }
            _ = try model.forward(try backend.tensor(ints: ids, shape: [m, windows.seqLen]), training: false, step: 0)
            for layer in model.layers {
                guard let mlp = layer.ffn as? GatedMLP else { continue }
                // The layer keeps gate and up ([rows, 2I]); its activation is silu(gate) * up.
                let i = mlp.hidden
                let gu = try mlp.ws.get("h", [m * windows.seqLen, 2 * i]).floats()
                var s = sums[layer.index] ?? [Double](repeating: 0, count: i)
                for r in 0..<(m * windows.seqLen) {
                    for h in 0..<i {
                        let g = Double(gu[r * 2 * i + h]), v = g / (1 + exp(-g)) * Double(gu[r * 2 * i + i + h])
                        s[h] += v * v
                    }
                }
                sums[layer.index] = s
            }
            start += m
        }
        return sums.mapValues { $0.map { $0.squareRoot() } }
    }
}
