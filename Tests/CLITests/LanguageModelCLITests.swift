import Foundation
import XCTest
import MoECheckpoint
import MoECompute
import MoEModel
@testable import moe_gpu

/// `eval` on text, `tokenize` and `export` for language models: tiny byte-level
/// Llama / Mixtral models built here (or trained for 3 steps), CPU only.
final class LanguageModelCLITests: XCTestCase {
    /// A byte-level model (vocab 259) small enough to run in milliseconds.
    func byteLM(moe router: String? = nil, moeLayers: [Int] = [0, 1], renormalize: Bool = true) -> LMConfig {
        var c = LMConfig()
        c.vocabSize = 259; c.hidden = 16; c.intermediate = 24; c.layers = 2; c.heads = 2; c.kvHeads = 1
        c.ropeTheta = 500; c.maxPositions = 64; c.tieEmbeddings = false; c.rmsNormEps = 1e-6
        c.bosID = 256; c.eosID = 257; c.padID = 258; c.tokenizer = "byte"
        if let router {
            var m = MoEConfig()
            m.router = router; m.experts = 4; m.topK = 2; m.gateOrder = "softmax-topk"; m.renormalize = renormalize
            m.capacityFactor = router == "expert-choice" ? 2 : nil
            m.auxLossCoefficient = 0.01; m.zLossCoefficient = 0.001
            c.moe = m; c.moeLayers = moeLayers
        }
        return c
    }

    /// The model with sharpened weights (so losses and routing are far from uniform), saved as a moe-gpu model.safetensors.
    func savedModel(_ c: LMConfig, in dir: URL, seed: UInt64 = 3) throws -> (model: LlamaModel, file: URL) {
        let model = try LlamaModel(config: c, backend: CPUBackend(), seed: seed, training: false)
        for p in model.params.all {
            if p.name.hasSuffix("embed_tokens.weight") || p.name.hasSuffix("lm_head.weight") { try model.backend.scale(p.value, by: 40) }
            if p.name.hasSuffix("gate.weight") { try model.backend.scale(p.value, by: 50) }
        }
        let file = dir.appendingPathComponent("model.safetensors")
        try ModelCheckpoint.save(model, to: file)
        return (model, file)
    }

    /// Some UTF-8 text (multi-byte characters included), deterministic.
    func writeText(_ dir: URL, bytes: Int = 300) throws -> (url: URL, bytes: [UInt8]) {
        let words = ["the", "quick", "brown", "fox", "naïve", "café", "jumps", "over", "lazy", "dog", "—", "river", "\n"]
        var rng = SplitMix64(seed: 11)
        var text = ""
        while text.utf8.count < bytes { text += words[Int(rng.next() % UInt64(words.count))] + " " }
        let url = dir.appendingPathComponent("text.txt")
        try text.write(to: url, atomically: true, encoding: .utf8)
        return (url, Array(text.utf8))
    }

    /// Mean next-token cross-entropy over non-overlapping windows, computed in float64 from `forward`'s logits, one window at a time.
    func directLoss(_ model: LlamaModel, _ ids: [Int32], seqLen n: Int) throws -> (loss: Double, tokens: Int, windows: Int) {
        var sum = 0.0, tokens = 0, windows = 0, s = 0
        let v = model.config.vocabSize
        while s + 1 < ids.count {
            let w = Array(ids[s..<min(s + n, ids.count)])
            let logits = try model.forward(try model.backend.tensor(ints: w, shape: [1, w.count]), training: false, step: 0).floats()
            for t in 0..<(w.count - 1) {
                let row = logits[(t * v)..<((t + 1) * v)].map(Double.init)
                let top = row.max()!
                let lse = top + log(row.reduce(0) { $0 + exp($1 - top) })
                sum += lse - row[Int(w[t + 1])]
            }
            tokens += w.count - 1; windows += 1; s += n
        }
        return (sum / Double(tokens), tokens, windows)
    }

    func json(_ r: CLI.Result) throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout + r.stderr)
    }

    /// A failed run: non-zero status and exactly one line on stderr containing `phrase`.
    func assertOneLineError(_ args: [String], _ phrase: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try CLI.run(args)
        XCTAssertNotEqual(r.status, 0, r.stdout, file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "expected one error line, got: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.contains(phrase), "\(phrase) not in: \(r.stderr)", file: file, line: line)
    }

    // MARK: eval

    func testEvalLossEqualsCrossEntropyOfTheSameWindows() throws {
        let dir = try CLI.temporaryDirectory(self)
        let (text, bytes) = try writeText(dir)
        for (name, config) in [("dense", byteLM()), ("moe", byteLM(moe: "topk"))] {
            let sub = dir.appendingPathComponent(name)
            try FileManager.default.createDirectory(at: sub, withIntermediateDirectories: true)
            let (model, file) = try savedModel(config, in: sub)
            let ids = bytes.map(Int32.init)
            for (bos, seqLen) in [(false, 16), (true, 16), (false, 64)] {
                var args = ["eval", "--checkpoint", file.path, "--data", text.path, "--seq-len", "\(seqLen)", "--json", "--device", "cpu"]
                if bos { args.append("--bos") }
                let r = try CLI.run(args)
                XCTAssertEqual(r.status, 0, r.stderr)
                let o = try json(r)
                let want = try directLoss(model, bos ? [256] + ids : ids, seqLen: seqLen)
                let what = "\(name) bos \(bos) seq-len \(seqLen)"
                XCTAssertEqual(o["loss"] as? Double ?? .nan, want.loss, accuracy: 2e-5 * want.loss, what)
                XCTAssertEqual(o["perplexity"] as? Double ?? .nan, exp(want.loss), accuracy: 1e-4 * exp(want.loss), what)
                XCTAssertEqual(o["tokens"] as? Int, want.tokens, what)
                XCTAssertEqual(o["windows"] as? Int, want.windows, what)
                XCTAssertEqual(o["device"] as? String, "cpu", what)
                XCTAssertNotNil(o["seconds"] as? Double, what)
                // Far from a uniform guess, so the check means something.
                XCTAssertGreaterThan(abs(want.loss - log(259)), 0.5, what)
            }
        }
        // The default window: min(1024, the model's context of 64); the text form names loss and perplexity.
        let (_, file) = try savedModel(byteLM(), in: dir)
        let r = try CLI.run(["eval", "--checkpoint", file.path, "--data", text.path, "--device", "cpu"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("perplexity") && r.stdout.contains("windows of up to 64 tokens"), r.stdout)
    }

    // MARK: tokenize

    func testTokenizeByteModelPrintsLlamaTokenizeLinesAndIds() throws {
        let dir = try CLI.temporaryDirectory(self)
        let (_, file) = try savedModel(byteLM(), in: dir)
        let text = dir.appendingPathComponent("hi.txt")
        try Data("Hi!\n".utf8).write(to: text)
        let r = try CLI.run(["tokenize", "--checkpoint", file.path, "--text", text.path])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "    72 -> 'H'\n   105 -> 'i'\n    33 -> '!'\n    10 -> '\n'\n")
        let ids = try CLI.run(["tokenize", "--checkpoint", file.path, "--text", text.path, "--json"])
        XCTAssertEqual(ids.status, 0, ids.stderr)
        XCTAssertEqual(ids.stdout, "[72, 105, 33, 10]\n")
        XCTAssertEqual(try JSONSerialization.jsonObject(with: Data(ids.stdout.utf8)) as? [Int], [72, 105, 33, 10])
    }

    /// A tokenizer.json whose tokenizer_config.json asks for BOS gets it first, as llama-tokenize adds it.
    func testTokenizeAddsBOSWhenTheTokenizerSaysSo() throws {
        let dir = try CLI.temporaryDirectory(self)
        let tokenizer = """
            {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġab": 4}, "merges": ["a b", "Ġ ab"]},
             "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
             "added_tokens": [{"id": 5, "content": "<s>", "special": true}]}
            """
        try tokenizer.write(to: dir.appendingPathComponent("tokenizer.json"), atomically: true, encoding: .utf8)
        let text = dir.appendingPathComponent("t.txt")
        try "ab ab".write(to: text, atomically: true, encoding: .utf8)
        for addBOS in [true, false] {
            try "{\"bos_token\": \"<s>\", \"add_bos_token\": \(addBOS)}".write(to: dir.appendingPathComponent("tokenizer_config.json"),
                                                                                atomically: true, encoding: .utf8)
            let r = try CLI.run(["tokenize", "--checkpoint", dir.appendingPathComponent("tokenizer.json").path, "--text", text.path])
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertEqual(r.stdout, (addBOS ? "     5 -> '<s>'\n" : "") + "     2 -> 'ab'\n     4 -> ' ab'\n")
            // The folder names the same tokenizer.
            let ids = try CLI.run(["tokenize", "--checkpoint", dir.path, "--text", text.path, "--ids"])
            XCTAssertEqual(ids.stdout, addBOS ? "[5, 2, 4]\n" : "[2, 4]\n", ids.stderr)
        }
        // eval puts no BOS first unless --bos, whatever the tokenizer's setting (add_bos_token is true now).
        var c = byteLM()
        c.tokenizer = dir.path
        let models = dir.appendingPathComponent("m")
        try FileManager.default.createDirectory(at: models, withIntermediateDirectories: true)
        let (model, file) = try savedModel(c, in: models)
        for bos in [false, true] {
            let r = try CLI.run(["eval", "--checkpoint", file.path, "--data", text.path, "--json"] + (bos ? ["--bos"] : []))
            XCTAssertEqual(r.status, 0, r.stderr)
            let o = try json(r)
            XCTAssertEqual(o["tokens"] as? Int, bos ? 2 : 1)
            XCTAssertEqual(o["loss"] as? Double ?? .nan, try directLoss(model, bos ? [5, 2, 4] : [2, 4], seqLen: 64).loss, accuracy: 1e-4)
        }
    }

    // MARK: export

    func testExportMoEWritesAMixtralFolderThatReloadsToTheSameLogits() throws {
        let dir = try CLI.temporaryDirectory(self)
        let c = byteLM(moe: "topk")
        let (model, file) = try savedModel(c, in: dir)
        let out = dir.appendingPathComponent("hf")
        let r = try CLI.run(["export", "--run", file.path, "--to", out.path])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("MixtralForCausalLM"), r.stdout)
        XCTAssertTrue(r.stdout.contains("note:") && r.stdout.contains("tokenizer is not exported"), r.stdout)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: out.path).sorted(), ["config.json", "model.safetensors"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted(), ["hf", "model.safetensors"], "temporary folders left")

        let cfg = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: out.appendingPathComponent("config.json"))) as? [String: Any])
        XCTAssertEqual(cfg["architectures"] as? [String], ["MixtralForCausalLM"])
        XCTAssertEqual(cfg["model_type"] as? String, "mixtral")
        let ints: [String: Int] = ["hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 64, "vocab_size": 259,
                                   "num_local_experts": 4, "num_experts_per_tok": 2, "bos_token_id": 256, "eos_token_id": 257,
                                   "pad_token_id": 258]
        for (k, v) in ints { XCTAssertEqual(cfg[k] as? Int, v, k) }
        XCTAssertEqual(cfg["rope_theta"] as? Double, 500)
        XCTAssertEqual(cfg["rms_norm_eps"] as? Double, 1e-6)
        XCTAssertEqual(cfg["tie_word_embeddings"] as? Bool, false)

        // Per-expert Mixtral names and Hugging Face shapes.
        let st = try SafetensorsFile(path: out.appendingPathComponent("model.safetensors").path)
        XCTAssertEqual(st.metadata["format"], "pt")
        var shapes: [String: [Int]] = [:]
        for e in st.entries { shapes[e.name] = e.shape }
        XCTAssertEqual(shapes.count, 3 + 2 * (2 + 4 + 1 + 4 * 3))
        XCTAssertEqual(shapes["model.embed_tokens.weight"], [259, 16])
        XCTAssertEqual(shapes["lm_head.weight"], [259, 16])
        XCTAssertEqual(shapes["model.norm.weight"], [16])
        for l in 0..<2 {
            let p = "model.layers.\(l)."
            XCTAssertEqual(shapes[p + "self_attn.q_proj.weight"], [16, 16])
            XCTAssertEqual(shapes[p + "self_attn.k_proj.weight"], [8, 16])
            XCTAssertEqual(shapes[p + "self_attn.v_proj.weight"], [8, 16])
            XCTAssertEqual(shapes[p + "self_attn.o_proj.weight"], [16, 16])
            XCTAssertEqual(shapes[p + "input_layernorm.weight"], [16])
            XCTAssertEqual(shapes[p + "post_attention_layernorm.weight"], [16])
            XCTAssertEqual(shapes[p + "block_sparse_moe.gate.weight"], [4, 16])
            for e in 0..<4 {
                XCTAssertEqual(shapes[p + "block_sparse_moe.experts.\(e).w1.weight"], [24, 16])
                XCTAssertEqual(shapes[p + "block_sparse_moe.experts.\(e).w3.weight"], [24, 16])
                XCTAssertEqual(shapes[p + "block_sparse_moe.experts.\(e).w2.weight"], [16, 24])
            }
        }

        // Read back through config.json (no moe-gpu metadata in the export): the same model, the same logits.
        XCTAssertNil(st.metadata["moe-gpu.lm_config"])
        try assertSameLogits(model, reloaded: out)

        // An existing folder is kept unless --force.
        let again = try CLI.run(["export", "--run", file.path, "--to", out.path])
        XCTAssertNotEqual(again.status, 0)
        XCTAssertTrue(again.stderr.contains("--force"), again.stderr)
        let forced = try CLI.run(["export", "--run", file.path, "--to", out.path, "--force"])
        XCTAssertEqual(forced.status, 0, forced.stderr)
        try assertSameLogits(model, reloaded: out)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted(), ["hf", "model.safetensors"])

        // Under a file-size limit (EFBIG, SIGXFSZ ignored): an error, the previous export intact, no partial folder.
        let before = try Data(contentsOf: out.appendingPathComponent("model.safetensors"))
        let limited = try CLI.run(["-c", "ulimit -f 4; trap '' XFSZ; exec \"$0\" \"$@\"", CLI.binary.path,
                                   "export", "--run", file.path, "--to", out.path, "--force"], binary: URL(fileURLWithPath: "/bin/bash"))
        XCTAssertNotEqual(limited.status, 0)
        XCTAssertTrue(limited.stderr.contains("File too large"), limited.stderr)
        XCTAssertEqual(limited.stderr.split(separator: "\n").count, 1, limited.stderr)
        XCTAssertEqual(try Data(contentsOf: out.appendingPathComponent("model.safetensors")), before)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted(), ["hf", "model.safetensors"])
    }

    func assertSameLogits(_ model: LlamaModel, reloaded folder: URL, file: StaticString = #filePath, line: UInt = #line) throws {
        let (source, config) = try LlamaCheckpoint.open(folder.path)
        var expected = model.config
        expected.tokenizer = config.tokenizer
        expected.headDim = expected.resolvedHeadDim   // config.json states it
        if var m = expected.moe {   // training-only settings transformers' config does not carry
            m.auxLossCoefficient = config.moe!.auxLossCoefficient; m.zLossCoefficient = config.moe!.zLossCoefficient
            expected.moe = m
        }
        XCTAssertEqual(config, expected, file: file, line: line)
        let copy = try LlamaModel(config: config, backend: CPUBackend(), seed: 99, training: false)
        try LlamaCheckpoint.load(source, into: copy)
        var rng = SplitMix64(seed: 5)
        let ids = (0..<(3 * 20)).map { _ in Int32(rng.next() % 259) }
        let a = try model.forward(try model.backend.tensor(ints: ids, shape: [3, 20]), training: false, step: 0).floats()
        let b = try copy.forward(try copy.backend.tensor(ints: ids, shape: [3, 20]), training: false, step: 0).floats()
        XCTAssertEqual(a, b, "logits of the exported model differ", file: file, line: line)
    }

    /// A real run folder (3 steps of `train --task lm --init scratch`): eval reads it, export writes a Llama folder.
    func testDenseRunFolderEvaluatesAndExportsAsLlama() throws {
        let dir = try CLI.temporaryDirectory(self)
        let (text, bytes) = try writeText(dir, bytes: 1200)
        let lm = """
            {"vocabSize": 259, "hidden": 16, "intermediate": 24, "layers": 2, "heads": 2, "kvHeads": 1, "headDim": 0,
             "ropeTheta": 10000, "rmsNormEps": 1e-05, "tieEmbeddings": true, "maxPositions": 64, "bosID": 256, "eosID": 257,
             "padID": 258, "tokenizer": "byte", "moeLayers": []}
            """
        let config = dir.appendingPathComponent("train.json")
        try """
            {"task": "lm", "lm": \(lm), "seqLen": 32, "batchSize": 4, "steps": 3, "learningRate": 0.003, "warmupSteps": 1,
             "evalEvery": 0, "testExamples": 4, "logEvery": 1, "labelSmoothing": 0, "augment": false}
            """.write(to: config, atomically: true, encoding: .utf8)
        let run = dir.appendingPathComponent("run")
        let t = try CLI.run(["train", "--config", config.path, "--init", "scratch", "--data", text.path, "--out", run.path, "--device", "cpu"])
        XCTAssertEqual(t.status, 0, t.stderr)

        let e = try CLI.run(["eval", "--checkpoint", run.path, "--data", text.path, "--seq-len", "32", "--json"])
        XCTAssertEqual(e.status, 0, e.stderr)
        let o = try json(e)
        let windows = (bytes.count + 31) / 32 - (bytes.count % 32 == 1 ? 1 : 0)
        XCTAssertEqual(o["windows"] as? Int, windows)
        XCTAssertEqual(o["tokens"] as? Int, bytes.count - windows)

        let out = dir.appendingPathComponent("hf-llama")
        let x = try CLI.run(["export", "--run", run.path, "--to", out.path])
        XCTAssertEqual(x.status, 0, x.stderr)
        let cfg = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: out.appendingPathComponent("config.json"))) as? [String: Any])
        XCTAssertEqual(cfg["architectures"] as? [String], ["LlamaForCausalLM"])
        XCTAssertEqual(cfg["model_type"] as? String, "llama")
        XCTAssertEqual(cfg["intermediate_size"] as? Int, 24)
        XCTAssertEqual(cfg["head_dim"] as? Int, 8)
        XCTAssertEqual(cfg["tie_word_embeddings"] as? Bool, true)
        XCTAssertEqual(cfg["rope_theta"] as? Double, 10000)
        XCTAssertEqual(cfg["rms_norm_eps"] as? Double, 1e-5)
        let st = try SafetensorsFile(path: out.appendingPathComponent("model.safetensors").path)
        XCTAssertEqual(Set(st.entries.map(\.name)).count, 3 + 2 * 9 - 1)   // tied: no lm_head.weight
        XCTAssertNil(st.entry("lm_head.weight"))
        XCTAssertNotNil(st.entry("model.layers.1.mlp.down_proj.weight"))

        // The trained weights, read back through config.json, give the run's logits.
        let (source, trained) = try LlamaCheckpoint.open(run.appendingPathComponent("model.safetensors").path)
        let model = try LlamaModel(config: trained, backend: CPUBackend(), seed: 0, training: false)
        try LlamaCheckpoint.load(source, into: model)
        try assertSameLogits(model, reloaded: out)
    }

    /// The tokenizer of a Hugging Face folder travels with the export.
    func testExportCopiesAHuggingFaceTokenizer() throws {
        let dir = try CLI.temporaryDirectory(self)
        let tok = dir.appendingPathComponent("tok")
        try FileManager.default.createDirectory(at: tok, withIntermediateDirectories: true)
        try "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}".write(to: tok.appendingPathComponent("tokenizer.json"), atomically: true, encoding: .utf8)
        try "{\"add_bos_token\": false}".write(to: tok.appendingPathComponent("tokenizer_config.json"), atomically: true, encoding: .utf8)
        var c = byteLM()
        c.tokenizer = tok.path
        let (_, file) = try savedModel(c, in: dir)
        let out = dir.appendingPathComponent("hf")
        let r = try CLI.run(["export", "--run", file.path, "--to", out.path])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(r.stdout.contains("note:"), r.stdout)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: out.path).sorted(),
                       ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
        XCTAssertEqual(try Data(contentsOf: out.appendingPathComponent("tokenizer.json")), try Data(contentsOf: tok.appendingPathComponent("tokenizer.json")))
    }

    /// Llama 3 rope scaling survives the export, dense and MoE.
    func testExportKeepsLlama3RopeScaling() throws {
        let dir = try CLI.temporaryDirectory(self)
        for (name, router) in [("dense", nil), ("moe", "topk")] as [(String, String?)] {
            var c = byteLM(moe: router)
            c.ropeScaling = LMRopeScaling(factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 16)
            let sub = dir.appendingPathComponent(name)
            try FileManager.default.createDirectory(at: sub, withIntermediateDirectories: true)
            let (model, file) = try savedModel(c, in: sub)
            let out = sub.appendingPathComponent("hf")
            let r = try CLI.run(["export", "--run", file.path, "--to", out.path])
            XCTAssertEqual(r.status, 0, r.stderr)
            let cfg = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: out.appendingPathComponent("config.json"))) as? [String: Any])
            let scaling = try XCTUnwrap(cfg["rope_scaling"] as? [String: Any], name)
            XCTAssertEqual(scaling["rope_type"] as? String, "llama3", name)
            XCTAssertEqual(scaling["factor"] as? Double, 8, name)
            XCTAssertEqual(scaling["original_max_position_embeddings"] as? Int, 16, name)
            try assertSameLogits(model, reloaded: out)
        }
    }

    /// Batches keep the logits under 256 MB, and never drop below one window.
    func testEvalBatchesBoundTheLogits() {
        var smol = LMConfig()
        smol.vocabSize = 49152; smol.hidden = 576; smol.intermediate = 1536; smol.layers = 30; smol.heads = 9; smol.kvHeads = 3
        XCTAssertEqual(TextEvaluation.windowsPerBatch(config: smol, seqLen: 1024), 1)
        for n in [16, 128, 1024] {
            let w = TextEvaluation.windowsPerBatch(config: byteLM(moe: "topk"), seqLen: n)
            XCTAssertGreaterThan(w, 1)
            XCTAssertLessThanOrEqual(w * n * 259 * 4, 256 << 20)
        }
        XCTAssertEqual(TextEvaluation.windows(count: 33, seqLen: 16), [0..<16, 16..<32])   // a lone last token predicts nothing
        XCTAssertEqual(TextEvaluation.windows(count: 34, seqLen: 16), [0..<16, 16..<32, 32..<34])
        XCTAssertEqual(TextEvaluation.windows(count: 34, seqLen: 16, limit: 1), [0..<16])
    }

    func testOpenCLEvalMatchesTheCPU() throws {
        try CLI.requireOpenCL()
        let dir = try CLI.temporaryDirectory(self)
        let (text, _) = try writeText(dir)
        let (_, file) = try savedModel(byteLM(moe: "topk"), in: dir)
        var losses: [Double] = []
        for device in ["cpu", "opencl"] {
            let r = try CLI.run(["eval", "--checkpoint", file.path, "--data", text.path, "--seq-len", "32", "--json", "--device", device])
            XCTAssertEqual(r.status, 0, r.stderr)
            losses.append(try json(r)["loss"] as? Double ?? .nan)
        }
        XCTAssertEqual(losses[1], losses[0], accuracy: 1e-4 * losses[0])
    }

    // MARK: errors

    func testLanguageModelErrorsAreOneClearLine() throws {
        let dir = try CLI.temporaryDirectory(self)
        let (text, _) = try writeText(dir)
        let (_, file) = try savedModel(byteLM(), in: dir)
        let latin1 = dir.appendingPathComponent("latin1.txt")
        try Data([0x63, 0x61, 0x66, 0xE9, 0x0A]).write(to: latin1)
        try assertOneLineError(["eval", "--checkpoint", file.path, "--data", latin1.path], "not valid UTF-8 (byte 3")
        try assertOneLineError(["eval", "--checkpoint", file.path, "--data", dir.appendingPathComponent("missing.txt").path], "does not exist")
        try assertOneLineError(["eval", "--checkpoint", file.path, "--data", text.path, "--seq-len", "65"], "exceeds the model's context of 64")
        try assertOneLineError(["eval", "--checkpoint", file.path], "--data FILE is required")

        // Other architectures: a GGUF of GPT-2, a Hugging Face BERT folder.
        var gguf = Data("GGUF".utf8)
        func le<T: FixedWidthInteger>(_ v: T) -> Data { var x = v.littleEndian; return Data(bytes: &x, count: MemoryLayout<T>.size) }
        func str(_ s: String) -> Data { le(UInt64(s.utf8.count)) + Data(s.utf8) }
        gguf += le(UInt32(3)) + le(UInt64(0)) + le(UInt64(1)) + str("general.architecture") + le(UInt32(8)) + str("gpt2")
        let ggufURL = dir.appendingPathComponent("gpt2.gguf")
        try gguf.write(to: ggufURL)
        try assertOneLineError(["eval", "--checkpoint", ggufURL.path, "--data", text.path], "architecture \"gpt2\" is not supported")
        let bert = dir.appendingPathComponent("bert")
        try FileManager.default.createDirectory(at: bert, withIntermediateDirectories: true)
        try "{\"model_type\": \"bert\", \"hidden_size\": 16}".write(to: bert.appendingPathComponent("config.json"), atomically: true, encoding: .utf8)
        try writeSafetensors(to: bert.appendingPathComponent("model.safetensors"),
                             tensors: [("embeddings.word_embeddings.weight", .F32, [4, 16], encodeFloats([Float](repeating: 0, count: 64), as: .F32))])
        try assertOneLineError(["eval", "--checkpoint", bert.path, "--data", text.path], "\"bert\"")

        // Exports transformers cannot compute exactly.
        for (name, config, phrase) in [("ec", byteLM(moe: "expert-choice"), "expert-choice"),
                                       ("subset", byteLM(moe: "topk", moeLayers: [1]), "only some of the 2 layers"),
                                       ("plain", byteLM(moe: "topk", renormalize: false), "renormalize false")] {
            let sub = dir.appendingPathComponent(name)
            try FileManager.default.createDirectory(at: sub, withIntermediateDirectories: true)
            let (_, f) = try savedModel(config, in: sub)
            let out = dir.appendingPathComponent("out-\(name)")
            try assertOneLineError(["export", "--run", f.path, "--to", out.path], phrase)
            XCTAssertFalse(FileManager.default.fileExists(atPath: out.path), name)
        }
        try assertOneLineError(["export", "--run", bert.path, "--to", dir.appendingPathComponent("x").path], "not a moe-gpu language model")
        try assertOneLineError(["export", "--run", file.path, "--to", dir.path, "--force"], "holds the run being exported")
    }

    /// A ViT checkpoint still gets the image evaluation.
    func testEvalOfAViTCheckpointStillReportsAccuracy() throws {
        let dir = try CLI.temporaryDirectory(self)
        var c = ViTConfig()
        c.imageSize = 8; c.patchSize = 4; c.width = 8; c.depth = 1; c.heads = 2; c.mlpRatio = 2; c.classes = 3
        let model = try ViT(config: c, backend: CPUBackend(), seed: 0)
        let file = dir.appendingPathComponent("vit.safetensors")
        try ModelCheckpoint.save(model, to: file)
        var rng = SplitMix64(seed: 1)
        let rows = (0..<12).map { i in ((0..<64).map { _ in "\(rng.next() % 256)" } + ["\(i % 3)"]).joined(separator: ",") }
        let csv = dir.appendingPathComponent("tiny.csv")
        try (rows.joined(separator: "\n") + "\n").write(to: csv, atomically: true, encoding: .utf8)
        let r = try CLI.run(["eval", "--checkpoint", file.path, "--data", csv.path, "--json", "--device", "cpu"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let o = try json(r)
        XCTAssertNotNil(o["accuracy"] as? Double, r.stdout)
        XCTAssertEqual(o["examples"] as? Int, 2)
        try assertOneLineError(["eval", "--checkpoint", file.path, "--data", csv.path, "--seq-len", "8"], "for language models")
    }

    /// `mpirun -np 2` on the decoder with a Mixtral block (routing statistics per
    /// micro-batch, as in accumulation), data parallel and expert parallel,
    /// equals one process on the same config.
    func testDataParallelDecoderEqualsOneProcess() throws {
        guard FileManager.default.isExecutableFile(atPath: CLI.mpirunPath) else {
            throw XCTSkip("Open MPI is not installed: apt-get install openmpi-bin (scripts/setup.sh test does)")
        }
        let dir = try CLI.temporaryDirectory(self)
        let text = try writeText(dir, bytes: 4000).url
        var t = TrainConfig()
        t.task = "lm"; t.lm = byteLM(moe: "topk", moeLayers: [0, 1]); t.data = text.path; t.evalData = text.path
        t.seqLen = 16; t.batchSize = 2; t.gradientAccumulation = 2; t.steps = 12; t.warmupSteps = 0
        t.learningRate = 3e-3; t.minLearningRate = 3e-3; t.evalEvery = 0; t.logEvery = 1; t.testExamples = 4; t.augment = false; t.labelSmoothing = 0
        let config = dir.appendingPathComponent("lm.json")
        try JSONEncoder().encode(t).write(to: config)
        func losses(_ out: URL) throws -> [Double] {
            try String(contentsOf: out.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n").map {
                try XCTUnwrap((try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["loss"] as? Double)
            }
        }
        let one = dir.appendingPathComponent("one"), two = dir.appendingPathComponent("two")
        let single = try CLI.run(["train", "--config", config.path, "--device", "cpu", "--out", one.path])
        XCTAssertEqual(single.status, 0, single.stderr)
        let ranks = try CLI.mpirun(ranks: 2, [CLI.binary.path, "train", "--config", config.path, "--device", "cpu", "--out", two.path])
        XCTAssertEqual(ranks.status, 0, ranks.stderr)
        // The same with the Mixtral block's experts split over the 2 ranks.
        let three = dir.appendingPathComponent("three")
        let ep = try CLI.mpirun(ranks: 2, [CLI.binary.path, "train", "--config", config.path, "--device", "cpu",
                                           "--out", three.path, "--expert-parallel", "2", "--zero-stage", "1"])
        XCTAssertEqual(ep.status, 0, ep.stderr)
        let a = try losses(one)
        XCTAssertEqual(a.count, 12)
        for (label, other) in [("data parallel", two), ("expert parallel", three)] {
            let b = try losses(other)
            XCTAssertEqual(b.count, 12, label)
            for (i, (x, y)) in zip(a, b).enumerated() { XCTAssertLessThan(abs(x - y) / abs(x), 1e-4, "\(label) step \(i + 1): \(x) vs \(y)") }
        }
        // The 2-rank runs left sharded models (one shard per rank and the index); export reads
        // them as a single process would and writes the Hugging Face folder of the same weights.
        XCTAssertTrue(FileManager.default.fileExists(atPath: two.appendingPathComponent("model.safetensors.index.json").path))
        var exported: [SafetensorsCheckpoint] = []
        for run in [one, two, three] {
            let to = dir.appendingPathComponent("hf-\(run.lastPathComponent)")
            let r = try CLI.run(["export", "--run", run.path, "--to", to.path])
            XCTAssertEqual(r.status, 0, r.stderr)
            exported.append(try SafetensorsCheckpoint(path: to.path))
        }
        for other in exported.dropFirst() {
            XCTAssertEqual(Set(other.tensors.map(\.name)), Set(exported[0].tensors.map(\.name)))
            for t in exported[0].tensors {
                let x = try exported[0].floats(t.name), y = try other.floats(t.name)
                let scale = max(x.map { abs($0) }.max() ?? 0, 1e-6)
                let diff = zip(x, y).map { abs($0 - $1) }.max() ?? 0
                XCTAssertLessThan(diff / scale, 1e-4, "\(t.name) of \(other.directory.lastPathComponent)")
            }
        }
    }
}
