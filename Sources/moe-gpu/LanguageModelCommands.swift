import ArgumentParser
import Foundation
import MoECheckpoint
import MoECompute
import MoEModel
import MoETokenizer

// The language-model commands beside training: `eval` on text (perplexity),
// `tokenize` (llama-tokenize's output), `export` (a trained run as a Hugging Face
// Llama or Mixtral folder).

/// A language-model command that cannot go on: one line naming the file, what is wrong and the way out.
struct LMCommandError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

/// Files and checkpoints as the language-model commands read them.
enum LMFiles {
    /// A folder holding `model.safetensors` (a moe-gpu run, a Hugging Face folder)
    /// stands for that file; anything else is itself.
    static func modelFile(_ path: String) -> String {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue else { return path }
        // A multi-rank run's model is a sharded set: its index stands for it.
        return TrainRun.modelFile(in: URL(fileURLWithPath: path))?.path ?? path
    }

    /// The safetensors `__metadata__` of `path`, a file or a sharded set's index
    /// (nil: not readable safetensors, e.g. GGUF or a folder).
    static func safetensorsMetadata(_ path: String) -> [String: String]? {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue else { return nil }
        if path.hasSuffix(".index.json") { return (try? SafetensorsCheckpoint(path: path))?.metadata }
        return (try? SafetensorsFile(path: path))?.metadata
    }

    /// Whether `path` (file or run folder) is a ViT checkpoint written by `moe-gpu train` (moe-gpu.config metadata).
    static func isViT(_ path: String) -> Bool {
        safetensorsMetadata(modelFile(path))?["moe-gpu.config"] != nil
    }

    /// The bytes of a file, with one-line errors for a missing file or a folder.
    static func readBytes(_ path: String, what: String) throws -> [UInt8] {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw LMCommandError("\(what) \(path) does not exist: give a UTF-8 text file")
        }
        guard !isDir.boolValue else { throw LMCommandError("\(what) \(path) is a folder: give one UTF-8 text file") }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw LMCommandError("cannot read \(what) \(path): check that it is a readable file")
        }
        return [UInt8](data)
    }

    /// A UTF-8 text file; invalid UTF-8 is an error naming the first bad byte and its line.
    static func readText(_ path: String, what: String) throws -> String {
        let bytes = try readBytes(path, what: what)
        if let text = String(validating: bytes, as: UTF8.self) { return text }
        let at = firstInvalidUTF8(bytes) ?? 0
        let line = bytes[..<at].reduce(1) { $0 + ($1 == 0x0A ? 1 : 0) }
        throw LMCommandError(String(format: "%@ %@ is not valid UTF-8 (byte %d, 0x%02X, on line %d); convert it first, e.g. iconv -f latin1 -t utf-8",
                                    what, path, at, bytes[at], line))
    }

    /// Offset of the first byte of the first invalid UTF-8 sequence, nil when there is none.
    static func firstInvalidUTF8(_ bytes: [UInt8]) -> Int? {
        var parser = Unicode.UTF8.ForwardParser()
        var it = bytes.makeIterator()
        var offset = 0
        while true {
            switch parser.parseScalar(from: &it) {
            case .valid(let s): offset += s.count
            case .emptyInput: return nil
            case .error: return offset
            }
        }
    }

    /// The tokenizer `path` stands for: a tokenizer.json, a GGUF file, a folder with a
    /// tokenizer.json, or a moe-gpu checkpoint / run folder (the tokenizer its model config names).
    static func tokenizer(for path: String) throws -> (tokenizer: Tokenizer, spec: String) {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw LMCommandError("\(path) does not exist: give a GGUF file, a Hugging Face folder, a tokenizer.json, or a moe-gpu checkpoint or run folder")
        }
        let direct: Bool
        if isDir.boolValue {
            direct = FileManager.default.fileExists(atPath: (path as NSString).appendingPathComponent("tokenizer.json"))
                && safetensorsMetadata(modelFile(path))?[lmConfigKey] == nil
        } else {
            direct = path.lowercased().hasSuffix(".json") || isGGUF(path)
        }
        let spec = direct ? path : try LlamaCheckpoint.open(path).config.tokenizer
        return (try LMRecipe.tokenizer(spec).tokenizer, spec)
    }

    static func isGGUF(_ path: String) -> Bool {
        guard let h = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? h.close() }
        return (try? h.read(upToCount: 4)) == Data("GGUF".utf8)
    }

    /// Where a moe-gpu language-model checkpoint keeps its LMConfig.
    static let lmConfigKey = "moe-gpu.lm_config"

    /// The BOS the tokenizer puts first on every encode (Llama's `add_bos_token`), nil when it does not.
    static func automaticBOS(_ t: Tokenizer) -> Int32? {
        let empty = t.encode(bytes: [])
        return empty.count == 1 && empty[0] == t.bosID ? empty[0] : nil
    }
}

/// JSON for stdout: non-finite numbers (a diverged model) become null.
func printJSON(_ object: [String: Any]) throws {
    var o = object
    for (k, v) in o { if let d = v as? Double, !d.isFinite { o[k] = NSNull() } }
    print(String(decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self))
}

// MARK: - eval on text

/// Loss and perplexity of a language model over non-overlapping windows of a text.
struct TextEvaluation {
    var lossSum = 0.0
    /// Predicted positions counted (a window of n tokens predicts n - 1).
    var tokens = 0
    var windows = 0
    var loss: Double { tokens > 0 ? lossSum / Double(tokens) : .nan }
    var perplexity: Double { exp(loss) }

    /// Windows `[i*n, min((i+1)*n, count))` of `ids`; a last window of one token predicts nothing and is left out.
    static func windows(count: Int, seqLen n: Int, limit: Int? = nil) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var s = 0
        while s + 1 < count {
            out.append(s..<min(s + n, count))
            s += n
        }
        if let limit { out = Array(out.prefix(max(limit, 0))) }
        return out
    }

    /// Windows per batch: logits under `logitBytes`, the model's own activations
    /// (a rough per-token estimate) under `activationBytes`; at least one window.
    static func windowsPerBatch(config c: LMConfig, seqLen n: Int, logitBytes: Int = 256 << 20, activationBytes: Int = 768 << 20) -> Int {
        let hd = c.resolvedHeadDim, d = c.hidden
        let attention = (c.heads + 2 * c.kvHeads) * hd + c.heads * hd
        let dense = 3 * c.intermediate
        let moe = c.moe.map { m in 2 * m.experts + m.topK * (2 * d + 3 * c.expertIntermediate) } ?? 0
        let perLayer = 8 * d + attention + (c.moeLayers.isEmpty ? dense : max(dense, moe))
        let perToken = 4 * (2 * d + c.layers * perLayer)
        let rows = min(logitBytes / max(4 * c.vocabSize, 1), activationBytes / max(perToken, 1))
        return max(1, rows / max(n, 1))
    }

    /// Sums the next-token cross-entropy of every window (batched by length).
    static func run(model: LlamaModel, ids: [Int32], windows: [Range<Int>], batchWindows: Int) throws -> TextEvaluation {
        let b = model.backend
        var r = TextEvaluation()
        var i = 0
        while i < windows.count {
            // A batch: consecutive windows of one length (all but perhaps the last are full).
            let len = windows[i].count
            var j = i
            while j < windows.count && j - i < batchWindows && windows[j].count == len { j += 1 }
            let batch = windows[i..<j]
            var inputs = [Int32](), labels = [Int32]()
            inputs.reserveCapacity(batch.count * len); labels.reserveCapacity(batch.count * len)
            for w in batch {
                inputs.append(contentsOf: ids[w])
                labels.append(contentsOf: ids[(w.lowerBound + 1)..<w.upperBound])
                labels.append(-100)
            }
            let rows = inputs.count
            let logits = try model.forward(try b.tensor(ints: inputs, shape: [batch.count, len]), training: false, step: 0)
            let rowLoss = try b.zeros([rows]), mean = try b.zeros([1])
            try b.crossEntropy(logits: logits, labels: try b.tensor(ints: labels, shape: [rows]), labelSmoothing: 0,
                               rowLoss: rowLoss, meanLoss: mean, dLogits: nil, gradientScale: 1)
            let losses = try rowLoss.floats()
            for k in 0..<rows where labels[k] >= 0 { r.lossSum += Double(losses[k]) }
            r.tokens += batch.count * (len - 1)
            r.windows += batch.count
            i = j
        }
        return r
    }
}

extension Eval {
    /// `eval` for a language model: `--data` is a UTF-8 text.
    func runLanguageModel() throws {
        guard let data else {
            throw LMCommandError("--data FILE is required to evaluate a language model: give a UTF-8 text file")
        }
        let (source, config) = try LlamaCheckpoint.open(checkpoint)
        let n = seqLen ?? min(1024, config.maxPositions)
        guard n <= config.maxPositions else {
            throw LMCommandError("--seq-len \(n) exceeds the model's context of \(config.maxPositions) tokens: use --seq-len \(config.maxPositions) or less")
        }
        guard n >= 2 else { throw LMCommandError("--seq-len \(n) is too short: a window needs at least 2 tokens to predict one") }
        let text = try LMFiles.readText(data, what: "data file")
        let (tokenizer, _) = try LMRecipe.tokenizer(config.tokenizer)

        // The text's tokens, BOS first only with --bos (whatever the tokenizer does by default).
        var ids = tokenizer.encode(text)
        if let auto = LMFiles.automaticBOS(tokenizer), ids.first == auto { ids.removeFirst() }
        if bos {
            guard let id = tokenizer.bosID ?? config.bosID else {
                throw LMCommandError("--bos: the tokenizer (\(config.tokenizer)) has no BOS token; drop --bos")
            }
            ids.insert(id, at: 0)
        }
        if let bad = ids.first(where: { $0 < 0 || Int($0) >= config.vocabSize }) {
            throw LMCommandError("the tokenizer (\(config.tokenizer)) gives id \(bad), outside the model's vocabulary of \(config.vocabSize): the checkpoint and its tokenizer do not match")
        }
        let windows = TextEvaluation.windows(count: ids.count, seqLen: n, limit: limit)
        guard !windows.isEmpty else {
            throw LMCommandError("\(data) has \(ids.count) token\(ids.count == 1 ? "" : "s"): at least 2 are needed to predict one")
        }

        let backend = try DeviceCatalog().makeBackend(try DeviceSelector.resolve(device))
        let model = try LlamaModel(config: config, backend: backend, seed: 0, sequenceLength: n, training: false, initialize: false)
        try LlamaCheckpoint.load(source, into: model)
        let start = Date()
        let r = try TextEvaluation.run(model: model, ids: ids, windows: windows,
                                       batchWindows: TextEvaluation.windowsPerBatch(config: config, seqLen: n))
        let seconds = Date().timeIntervalSince(start)
        if json {
            try printJSON(["checkpoint": checkpoint, "data": data, "loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens,
                           "windows": r.windows, "seq_len": n, "bos": bos, "seconds": seconds, "device": backend.name])
        } else {
            print(String(format: "%@: loss %.4f, perplexity %.3f over %d predicted tokens of %@ (%d windows of up to %d tokens%@; %@, %.1f s)",
                         checkpoint, r.loss, r.perplexity, r.tokens, data, r.windows, n, bos ? ", BOS first" : "",
                         backend.name, seconds))
        }
    }
}

// MARK: - tokenize

/// `moe-gpu tokenize`: a text's token ids as llama.cpp's `llama-tokenize` prints them.
struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the token ids of a text as llama.cpp's llama-tokenize does.",
        discussion: """
            One `%6d -> 'piece'` line per token, BOS first when the tokenizer's add-BOS setting says so \
            (add_bos_token / tokenizer.ggml.add_bos_token; never for the byte tokenizer), special tokens \
            matched in the text. The file is read as it is (like llama-tokenize --no-escape): no \\n escapes.
            """)

    @Option(name: .long, help: "A GGUF file, a Hugging Face folder, a tokenizer.json, or a moe-gpu checkpoint or run folder.")
    var checkpoint: String
    @Option(name: .long, help: "The text file to tokenize.")
    var text: String
    @Flag(name: [.long, .customLong("ids")], help: "Print the ids as one JSON array (llama-tokenize --ids).")
    var json = false

    func run() throws {
        let (tokenizer, _) = try LMFiles.tokenizer(for: checkpoint)
        let bytes = try LMFiles.readBytes(text, what: "text file")
        let ids = tokenizer.encode(bytes: bytes)
        var out: [UInt8] = []
        if json {
            out = Array(("[" + ids.map(String.init).joined(separator: ", ") + "]\n").utf8)
        } else {
            out.reserveCapacity(ids.count * 16)
            for id in ids {
                let number = String(id)
                out.append(contentsOf: repeatElement(UInt8(ascii: " "), count: max(0, 6 - number.utf8.count)))
                out.append(contentsOf: Array(number.utf8))
                out.append(contentsOf: Array(" -> '".utf8))
                out.append(contentsOf: Self.piece(id, tokenizer))
                out.append(contentsOf: Array("'\n".utf8))
            }
        }
        FileHandle.standardOutput.write(Data(out))
    }

    /// The token's bytes as written (raw, like llama.cpp on Linux); the byte tokenizer's specials by name.
    static func piece(_ id: Int32, _ t: Tokenizer) -> [UInt8] {
        if t is ByteTokenizer, id >= 256 {
            return Array((id == ByteTokenizer.bos ? "<bos>" : id == ByteTokenizer.eos ? "<eos>" : id == ByteTokenizer.pad ? "<pad>" : "<unk>").utf8)
        }
        return t.decode([id])
    }
}

// MARK: - export

/// `moe-gpu export`: a trained language model as a Hugging Face folder.
struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a trained language model as a Hugging Face folder (Llama, or Mixtral for an MoE run).",
        discussion: """
            --run is a folder written by `moe-gpu train --task lm` or its model.safetensors. A dense model \
            becomes LlamaForCausalLM, an MoE model MixtralForCausalLM (per-expert w1/w2/w3 tensors), with \
            config.json and model.safetensors (float32), and the tokenizer.json / tokenizer_config.json \
            when the model's tokenizer is a Hugging Face one. Only models transformers computes exactly are \
            exported: every layer MoE, top-k routing with the softmax renormalised over the chosen experts, \
            no capacity limit. The folder is written beside --to and renamed into place when complete.
            """)

    @Option(name: .customLong("run"), help: "A moe-gpu language-model run folder, or its model.safetensors.")
    var runPath: String
    @Option(name: .long, help: "The Hugging Face folder to write.")
    var to: String
    @Flag(name: .long, help: "Replace --to when it exists.")
    var force = false

    func run() throws {
        let fm = FileManager.default
        let modelPath = LMFiles.modelFile(runPath)
        guard fm.fileExists(atPath: modelPath) else {
            throw LMCommandError("\(runPath) does not exist: give a run folder written by moe-gpu train --task lm, or its model.safetensors")
        }
        var isDir: ObjCBool = false
        if fm.fileExists(atPath: modelPath, isDirectory: &isDir), isDir.boolValue {
            throw LMCommandError("\(runPath) has no model.safetensors: give a run folder written by moe-gpu train --task lm, or its model.safetensors")
        }
        guard let metadata = LMFiles.safetensorsMetadata(modelPath), metadata[LMFiles.lmConfigKey] != nil else {
            let vit = LMFiles.isViT(modelPath)
            throw LMCommandError("\(modelPath) is not a moe-gpu language model (no \(LMFiles.lmConfigKey) metadata)"
                + (vit ? ": it is a ViT, which has no Hugging Face export" : ": give a run folder written by moe-gpu train --task lm, or its model.safetensors"))
        }
        let source = try SafetensorsCheckpoint(path: modelPath)
        let config = try LlamaCheckpoint.config(of: source, path: modelPath)
        try Self.checkExportable(config)

        // The destination: never the run itself, never replaced without --force.
        let out = URL(fileURLWithPath: to).standardizedFileURL
        let runURL = URL(fileURLWithPath: modelPath).standardizedFileURL.resolvingSymlinksInPath()
        let outResolved = out.resolvingSymlinksInPath()
        if runURL.path == outResolved.path || runURL.path.hasPrefix(outResolved.path + "/") {
            throw LMCommandError("--to \(to) holds the run being exported: choose another folder")
        }
        if fm.fileExists(atPath: out.path) && !force {
            throw LMCommandError("\(to) already exists: pass --force to replace it, or choose another folder")
        }
        let parent = out.deletingLastPathComponent()
        guard fm.fileExists(atPath: parent.path) else {
            throw LMCommandError("the folder \(parent.path) that would hold \(out.lastPathComponent) does not exist")
        }

        let start = Date()
        let model = try LlamaModel(config: config, backend: CPUBackend(), seed: 0, sequenceLength: 1, training: false, initialize: false)
        try LlamaCheckpoint.load(source, into: model)

        let tmp = parent.appendingPathComponent(".\(out.lastPathComponent).export-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try fm.createDirectory(at: tmp, withIntermediateDirectories: false)
        var placed = false
        defer { if !placed { try? fm.removeItem(at: tmp) } }

        let configJSON = try Self.huggingFaceConfig(config)
        try Data((configJSON.serialized(pretty: true) + "\n").utf8).write(to: tmp.appendingPathComponent("config.json"))
        let tensors = model.checkpointTensors
        let writer = try SafetensorsStreamWriter(url: tmp.appendingPathComponent("model.safetensors"),
                                                 tensors: tensors.map { PlannedTensor(name: $0.name, dtype: .F32, shape: $0.shape) },
                                                 metadata: ["format": "pt"])
        var bytes = 0
        for t in tensors {
            try writer.write(t.name, floats: try t.value().floats())
            bytes += 4 * t.count
        }
        try writer.finish()
        let (copied, note) = try Self.copyTokenizer(config.tokenizer, into: tmp)

        // Into place: an existing folder (--force) is moved aside first and removed once the new one is there.
        var old: URL?
        if fm.fileExists(atPath: out.path) {
            let aside = parent.appendingPathComponent(".\(out.lastPathComponent).replaced-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
            guard rename(out.path, aside.path) == 0 else {
                throw LMCommandError("cannot move the existing \(to) aside: \(String(cString: strerror(errno)))")
            }
            old = aside
        }
        guard rename(tmp.path, out.path) == 0 else {
            let m = String(cString: strerror(errno))
            if let old { _ = rename(old.path, out.path) }
            throw LMCommandError("cannot move the finished export onto \(to): \(m)")
        }
        placed = true
        if let old { try? fm.removeItem(at: old) }

        let arch = config.moeLayers.isEmpty ? "LlamaForCausalLM" : "MixtralForCausalLM"
        let files = ["config.json", "model.safetensors"] + copied
        print(String(format: "wrote %@: %@, %d tensors (%.1f MB float32), %@ (%.1f s)", out.path, arch, tensors.count,
                     Double(bytes) / 1e6, files.joined(separator: ", "), Date().timeIntervalSince(start)))
        if let note { print("note: \(note)") }
    }

    /// What transformers' Llama / Mixtral cannot compute exactly is refused, naming why.
    static func checkExportable(_ c: LMConfig) throws {
        guard !c.moeLayers.isEmpty else { return }
        guard let m = c.moe else { throw LMCommandError("the model lists MoE layers \(c.moeLayers) but has no MoE config") }
        let why = "cannot be exported exactly: transformers' Mixtral"
        if Set(c.moeLayers) != Set(0..<c.layers) {
            throw LMCommandError("MoE layers \(c.moeLayers.sorted()) are only some of the \(c.layers) layers, which \(why) has an MoE block in every layer")
        }
        if m.router != "topk" {
            throw LMCommandError("router \"\(m.router)\" \(why) sends each token to its top-k experts by a renormalised softmax; expert-choice routing (each expert picks its tokens) has no equivalent there")
        }
        if m.gateOrder == "softmax-topk" && !m.renormalize {
            throw LMCommandError("top-k of the softmax without renormalisation (renormalize false) \(why) renormalises the chosen experts' weights to sum to 1")
        }
        if let f = m.capacityFactor {
            throw LMCommandError("capacity factor \(f) drops tokens over an expert's capacity, which \(why) never does (it is dropless)")
        }
    }

    /// f32 values as the shortest text that reads back to the same f32 (1e-05, 10000.0).
    static func f32(_ v: Float) -> JSONValue { .number("\(v)") }

    /// config.json: LlamaForCausalLM for a dense model, MixtralForCausalLM (built as `upcycle` builds it) for an MoE one.
    static func huggingFaceConfig(_ c: LMConfig) throws -> JSONValue {
        let ids: [(String, JSONValue)] = [("bos_token_id", c.bosID), ("eos_token_id", c.eosID), ("pad_token_id", c.padID)]
            .compactMap { k, v in v.map { (k, .int(Int($0))) } }
        let ropeScaling: JSONValue = c.ropeScaling.map { s in
            .object([("rope_type", .string("llama3")), ("factor", f32(s.factor)), ("low_freq_factor", f32(s.lowFreqFactor)),
                     ("high_freq_factor", f32(s.highFreqFactor)), ("original_max_position_embeddings", .int(s.originalMaxPositions))])
        } ?? .null
        if c.moeLayers.isEmpty {
            var m: [(String, JSONValue)] = [
                ("architectures", .array([.string("LlamaForCausalLM")])),
                ("model_type", .string("llama")),
                ("hidden_size", .int(c.hidden)),
                ("intermediate_size", .int(c.intermediate)),
                ("num_hidden_layers", .int(c.layers)),
                ("num_attention_heads", .int(c.heads)),
                ("num_key_value_heads", .int(c.kvHeads)),
                ("head_dim", .int(c.resolvedHeadDim)),
                ("hidden_act", .string("silu")),
                ("max_position_embeddings", .int(c.maxPositions)),
                ("rms_norm_eps", f32(c.rmsNormEps)),
                ("rope_theta", f32(c.ropeTheta)),
                ("rope_scaling", ropeScaling),
                ("tie_word_embeddings", .bool(c.tieEmbeddings)),
                ("vocab_size", .int(c.vocabSize)),
                ("attention_bias", .bool(false)),
                ("attention_dropout", .number("0.0")),
                ("mlp_bias", .bool(false)),
                ("pretraining_tp", .int(1)),
                ("initializer_range", .number("0.02")),
                ("use_cache", .bool(true)),
                ("torch_dtype", .string("float32")),
            ]
            m += ids
            return .object(m)
        }
        let moe = c.moe!
        var llama: [String: JSONValue] = [
            "num_attention_heads": .int(c.heads), "num_key_value_heads": .int(c.kvHeads), "head_dim": .int(c.resolvedHeadDim),
            "max_position_embeddings": .int(c.maxPositions), "rms_norm_eps": f32(c.rmsNormEps), "rope_theta": f32(c.ropeTheta),
            "vocab_size": .int(c.vocabSize), "initializer_range": .number("0.02"),
        ]
        for (k, v) in ids { llama[k] = v }
        let routing: [(String, JSONValue)] = [
            ("router", .string("topk")), ("gate_order", .string(moe.gateOrder)), ("renormalize", .bool(true)),
            ("num_experts", .int(moe.experts)), ("top_k", .int(moe.topK)), ("expert_width", .int(c.expertIntermediate)),
            ("moe_layers", .array(c.moeLayers.sorted().map { .int($0) })), ("source", .string("moe-gpu export")),
        ]
        var json = try LlamaConfig.mixtral(from: llama, hidden: c.hidden, layers: c.layers, expertWidth: c.expertIntermediate,
                                           experts: moe.experts, topK: moe.topK, vocab: c.vocabSize, tied: c.tieEmbeddings,
                                           routing: routing)
        if case .object(var members) = json, case .object(let scaling) = ropeScaling {
            // Llama 3 rope scaling: rope_scaling (transformers 4.x) and rope_parameters (5.x) both say it.
            members = members.map { k, v in k == "rope_parameters" ? (k, .object([("rope_theta", f32(c.ropeTheta))] + scaling)) : (k, v) }
            if let i = members.firstIndex(where: { $0.0 == "rope_theta" }) { members.insert(("rope_scaling", ropeScaling), at: i + 1) }
            json = .object(members)
        }
        return json
    }

    /// Copies the Hugging Face tokenizer files of `spec` into `dir`; a note when there are none to copy.
    static func copyTokenizer(_ spec: String, into dir: URL) throws -> (copied: [String], note: String?) {
        let fm = FileManager.default
        if spec == "byte" {
            return ([], "the byte tokenizer (ids 0-255 are the bytes, 256 BOS, 257 EOS, 258 PAD) has no Hugging Face form; the tokenizer is not exported")
        }
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: spec, isDirectory: &isDir) else {
            return ([], "the model's tokenizer \(spec) is not there any more; the tokenizer is not exported")
        }
        let folder = isDir.boolValue ? URL(fileURLWithPath: spec) : URL(fileURLWithPath: spec).deletingLastPathComponent()
        let json = isDir.boolValue ? folder.appendingPathComponent("tokenizer.json") : URL(fileURLWithPath: spec)
        guard json.pathExtension.lowercased() == "json", fm.fileExists(atPath: json.path) else {
            return ([], "the model's tokenizer is in the GGUF file \(spec), not a tokenizer.json; the tokenizer is not exported (transformers can convert it: AutoTokenizer.from_pretrained(folder, gguf_file=...))")
        }
        var copied = ["tokenizer.json"]
        try fm.copyItem(at: json, to: dir.appendingPathComponent("tokenizer.json"))
        let cfg = folder.appendingPathComponent("tokenizer_config.json")
        if fm.fileExists(atPath: cfg.path) {
            try fm.copyItem(at: cfg, to: dir.appendingPathComponent("tokenizer_config.json"))
            copied.append("tokenizer_config.json")
        }
        return (copied, nil)
    }
}
