import Foundation
import MoECheckpoint

/// The `tokenizer.*` metadata of a GGUF file, arrays in full (the checkpoint
/// reader keeps only a preview of long arrays).
struct GGUFTokenizerMetadata {
    var strings: [String: String] = [:]
    var ints: [String: Int64] = [:]
    var bools: [String: Bool] = [:]
    var stringArrays: [String: [String]] = [:]
    var intArrays: [String: [Int64]] = [:]

    init(path: String) throws {
        let name = (path as NSString).lastPathComponent
        let file: MappedFile
        do { file = try MappedFile(path: path) } catch { throw TokenizerError("\(error)") }
        let raw = file.all
        var pos = 0
        func bad(_ m: String) -> TokenizerError { TokenizerError("\(name): not a valid GGUF file: \(m)") }
        func take(_ n: Int) throws -> UnsafeRawBufferPointer {
            guard n >= 0, n <= raw.count - pos else { throw bad("truncated at byte \(pos)") }
            defer { pos += n }
            return UnsafeRawBufferPointer(rebasing: raw[pos..<(pos + n)])
        }
        func u32() throws -> UInt32 { UInt32(littleEndian: try take(4).loadUnaligned(as: UInt32.self)) }
        func u64() throws -> UInt64 { UInt64(littleEndian: try take(8).loadUnaligned(as: UInt64.self)) }
        func count() throws -> Int {
            let v = try u64()
            guard v <= UInt64(raw.count) else { throw bad("length \(v) at byte \(pos - 8) is larger than the file") }
            return Int(v)
        }
        func string() throws -> String {
            let b = try take(try count())
            guard let s = String(validating: b, as: UTF8.self) else { throw bad("string at byte \(pos - b.count) is not UTF-8") }
            return s
        }
        let fixed: [UInt32: Int] = [0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8]
        func integer(_ type: UInt32) throws -> Int64? {
            switch type {
            case 0: return Int64(try take(1)[0])
            case 1: return Int64(Int8(bitPattern: try take(1)[0]))
            case 2: return Int64(UInt16(littleEndian: try take(2).loadUnaligned(as: UInt16.self)))
            case 3: return Int64(Int16(littleEndian: try take(2).loadUnaligned(as: Int16.self)))
            case 4: return Int64(try u32())
            case 5: return Int64(Int32(bitPattern: try u32()))
            case 10: return Int64(bitPattern: try u64())
            case 11: return Int64(bitPattern: try u64())
            default: return nil
            }
        }
        guard raw.count >= 4, Array(try take(4)) == Array("GGUF".utf8) else { throw bad("bad magic (expected \"GGUF\")") }
        let version = try u32()
        guard version == 2 || version == 3 else { throw bad("version \(version) is not supported (only 2 and 3)") }
        _ = try u64()
        let kv = try count()
        for _ in 0..<kv {
            let key = try string()
            let type = try u32()
            let wanted = key.hasPrefix("tokenizer.")
            switch type {
            case 8:
                let s = try string()
                if wanted { strings[key] = s }
            case 7:
                let v = try take(1)[0] != 0
                if wanted { bools[key] = v }
            case 9:
                let et = try u32()
                let n = try count()
                if et == 8 {
                    var a: [String] = []
                    if wanted { a.reserveCapacity(n) }
                    for _ in 0..<n {
                        if wanted { a.append(try string()) } else { _ = try take(try count()) }
                    }
                    if wanted { stringArrays[key] = a }
                } else if let size = fixed[et] {
                    if wanted, et != 6, et != 7, et != 12 {
                        var a: [Int64] = []
                        a.reserveCapacity(n)
                        for _ in 0..<n { a.append(try integer(et)!) }
                        intArrays[key] = a
                    } else {
                        _ = try take(n * size)
                    }
                } else {
                    throw bad("metadata \(key) is an array of type \(et), which this reader cannot read")
                }
            default:
                guard let size = fixed[type] else { throw bad("unknown metadata value type \(type) for \(key)") }
                if wanted, let v = try integer(type) { ints[key] = v } else if !wanted || type == 6 || type == 12 { _ = try take(size) }
            }
        }
    }
}

extension ByteLevelBPETokenizer {
    /// The tokenizer a GGUF file describes (`tokenizer.ggml.model` = `gpt2`).
    public convenience init(gguf path: String) throws {
        let name = (path as NSString).lastPathComponent
        let m = try GGUFTokenizerMetadata(path: path)
        guard let model = m.strings["tokenizer.ggml.model"] else {
            throw TokenizerError("\(name) has no tokenizer (no tokenizer.ggml.model metadata); use a GGUF written with its tokenizer, or a tokenizer.json (ByteLevelBPETokenizer(tokenizerJSON:))")
        }
        guard model == "gpt2" else {
            throw TokenizerError("\(name): tokenizer model \"\(model)\" is not supported (only byte-level BPE, \"gpt2\"); use a tokenizer.json of a byte-level BPE model")
        }
        guard let tokens = m.stringArrays["tokenizer.ggml.tokens"], !tokens.isEmpty else {
            throw TokenizerError("\(name): tokenizer.ggml.tokens is missing; the file's tokenizer is incomplete, use its tokenizer.json instead")
        }
        guard let mergeStrings = m.stringArrays["tokenizer.ggml.merges"], !mergeStrings.isEmpty else {
            throw TokenizerError("\(name): tokenizer.ggml.merges is missing, and byte-level BPE cannot run without merges; use the model's tokenizer.json instead")
        }
        let pre = m.strings["tokenizer.ggml.pre"] ?? "default"
        // Pre-tokenizers whose split is the GPT-2 regex (transformers' GGUF converter builds ByteLevel
        // with it for all of these). SmolLM2's digits come out one by one anyway: its vocabulary has
        // no merges of digits.
        let gpt2Regex: Set<String> = ["default", "gpt2", "smollm", "starcoder", "refact"]
        guard gpt2Regex.contains(pre) else {
            throw TokenizerError("\(name): pre-tokenizer \"\(pre)\" is not supported (supported: \(gpt2Regex.sorted().joined(separator: ", "))); use the model's tokenizer.json instead")
        }
        let types = m.intArrays["tokenizer.ggml.token_type"] ?? []
        var special: [Int32] = []
        for (i, t) in types.enumerated() where t == 3 || t == 4 { special.append(Int32(i)) }
        let id = { (k: String) -> Int32? in m.ints["tokenizer.ggml.\(k)"].flatMap { Int32(exactly: $0) } }
        try self.init(source: name, tokens: tokens, merges: try Self.pairs(mergeStrings, name), special: special,
                      bos: id("bos_token_id"), eos: id("eos_token_id"), pad: id("padding_token_id"),
                      unknown: id("unknown_token_id"), addBOS: m.bools["tokenizer.ggml.add_bos_token"] ?? false,
                      splitDigits: false)
    }

    static func pairs(_ merges: [String], _ name: String) throws -> [(String, String)] {
        try merges.enumerated().map { (i, s) in
            guard let sp = s.firstIndex(of: " ") else { throw TokenizerError("\(name): merge \(i) \"\(s)\" is not two tokens separated by a space") }
            return (String(s[..<sp]), String(s[s.index(after: sp)...]))
        }
    }

    /// A Hugging Face `tokenizer.json` (model BPE, ByteLevel pre-tokenizer, optionally after
    /// `Digits`), with BOS/EOS/PAD from a `tokenizer_config.json` beside it when there is one.
    public convenience init(tokenizerJSON path: String) throws {
        let name = (path as NSString).lastPathComponent
        let url = URL(fileURLWithPath: path)
        let root: [String: Any]
        do {
            guard let r = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any] else {
                throw TokenizerError("\(path): not a JSON object; expected a Hugging Face tokenizer.json")
            }
            root = r
        } catch let e as TokenizerError { throw e } catch {
            throw TokenizerError("\(path): cannot read it as JSON (\(error.localizedDescription)); expected a Hugging Face tokenizer.json")
        }
        guard let model = root["model"] as? [String: Any] else { throw TokenizerError("\(name): no \"model\"; expected a Hugging Face tokenizer.json") }
        let type = model["type"] as? String ?? "BPE"
        guard type == "BPE" else {
            throw TokenizerError("\(name): tokenizer model \"\(type)\" is not supported (only byte-level BPE); convert the model's tokenizer or use its GGUF")
        }
        guard let vocab = model["vocab"] as? [String: Any], !vocab.isEmpty else { throw TokenizerError("\(name): model.vocab is missing or empty") }
        if root["normalizer"] != nil && !(root["normalizer"] is NSNull) {
            throw TokenizerError("\(name): a normalizer is set, which byte-level BPE here does not run; use the model's GGUF tokenizer")
        }
        // Pre-tokenizer: ByteLevel (regex on), possibly in a Sequence after Digits(individual_digits).
        var steps: [[String: Any]] = []
        if let pt = root["pre_tokenizer"] as? [String: Any] {
            steps = (pt["type"] as? String) == "Sequence" ? (pt["pretokenizers"] as? [[String: Any]] ?? []) : [pt]
        }
        var splitDigits = false, byteLevel = false
        for s in steps {
            switch s["type"] as? String {
            case "Digits" where (s["individual_digits"] as? Bool) == true && !byteLevel: splitDigits = true
            case "ByteLevel" where (s["use_regex"] as? Bool ?? true) && !(s["add_prefix_space"] as? Bool ?? false): byteLevel = true
            default:
                throw TokenizerError("\(name): pre-tokenizer \(s["type"] ?? "?") with these settings is not supported (only ByteLevel with use_regex and without add_prefix_space, after an optional Digits(individual_digits)); use the model's GGUF tokenizer")
            }
        }
        guard byteLevel else { throw TokenizerError("\(name): no ByteLevel pre-tokenizer; only byte-level BPE tokenizers are supported") }
        var size = 0
        var idOf: [String: Int] = [:]
        // Ids are dense in real files: bounding them by the number of entries keeps the
        // id table's size proportional to the file, not to a number written in it.
        let added = root["added_tokens"] as? [[String: Any]] ?? []
        let maxID = min(2 * (vocab.count + added.count) + 1024, 10_000_000)
        for (t, v) in vocab {
            guard let i = (v as? NSNumber)?.intValue, i >= 0, i < maxID else {
                throw TokenizerError("\(name): vocab entry \(t.debugDescription) has no valid id (ids run below \(maxID) for \(vocab.count) entries)")
            }
            idOf[t] = i; size = max(size, i + 1)
        }
        var special: [Int32] = []
        var specialText: [Int: String] = [:]
        for a in added {
            guard let i = (a["id"] as? NSNumber)?.intValue, i >= 0, i < maxID, let c = a["content"] as? String else { continue }
            special.append(Int32(i)); specialText[i] = c; size = max(size, i + 1)
        }
        var tokens = [String](repeating: "", count: size)
        for (t, i) in idOf { tokens[i] = t }
        for (i, c) in specialText { tokens[i] = c }
        guard let mergeList = model["merges"] as? [Any], !mergeList.isEmpty else {
            throw TokenizerError("\(name): model.merges is missing, and byte-level BPE cannot run without merges; use a complete tokenizer.json or the model's GGUF")
        }
        var pairs: [(String, String)] = []
        pairs.reserveCapacity(mergeList.count)
        for (i, m) in mergeList.enumerated() {
            if let s = m as? String { pairs.append(contentsOf: try Self.pairs([s], name)) }
            else if let a = m as? [String], a.count == 2 { pairs.append((a[0], a[1])) }
            else { throw TokenizerError("\(name): merge \(i) is neither \"a b\" nor [a, b]") }
        }
        // BOS/EOS/PAD/UNK by name from tokenizer_config.json, when present.
        var config: [String: Any] = [:]
        let cfgURL = url.deletingLastPathComponent().appendingPathComponent("tokenizer_config.json")
        if let d = try? Data(contentsOf: cfgURL), let c = try? JSONSerialization.jsonObject(with: d) as? [String: Any] { config = c }
        func tokenID(_ key: String) -> Int32? {
            let v = config[key]
            let text = (v as? String) ?? ((v as? [String: Any])?["content"] as? String)
            guard let t = text else { return nil }
            if let i = specialText.first(where: { $0.value == t })?.key { return Int32(i) }
            return idOf[t].map(Int32.init)
        }
        let modelUnk = (model["unk_token"] as? String).flatMap { u in specialText.first(where: { $0.value == u }).map { Int32($0.key) } ?? idOf[u].map(Int32.init) }
        let unk = tokenID("unk_token") ?? modelUnk
        try self.init(source: name, tokens: tokens, merges: pairs, special: special,
                      bos: tokenID("bos_token"), eos: tokenID("eos_token"), pad: tokenID("pad_token"), unknown: unk,
                      addBOS: config["add_bos_token"] as? Bool ?? false, splitDigits: splitDigits,
                      ignoreMerges: model["ignore_merges"] as? Bool ?? false, missingByteID: modelUnk)
    }
}
