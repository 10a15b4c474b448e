import Foundation
import XCTest
@testable import MoECheckpoint

final class GGUFTests: XCTestCase {
    /// One tensor of 32 values in `type`, read back through the file reader.
    func roundTrip(type: UInt32, block: Data, count: Int = 32) throws -> [Float] {
        let dir = try makeTempDir(self)
        var b = GGUFBuilder()
        b.addString("general.architecture", "llama")
        b.addU32("llama.attention.head_count", 1)
        b.tensors = [("blk.0.ffn_up.weight", [count, 1], type, block)]
        let url = dir.appendingPathComponent("t.gguf")
        try b.build().write(to: url)
        let g = try GGUFFile(path: url.path)
        XCTAssertEqual(g.tensors[0].shape, [1, count], "GGUF dims are fastest-first; the shape is reversed")
        return g.dequantize(g.tensors[0])
    }

    func testQ8_0Block() throws {
        // d = 0.5 (f16 0x3800), q = -16 ... 15.
        var block = GGUFBuilder.le(UInt16(0x3800))
        let q: [Int8] = (0..<32).map { (j: Int) -> Int8 in Int8(j - 16) }
        block += Data(q.map { UInt8(bitPattern: $0) })
        let expected: [Float] = q.map { Float($0) * 0.5 }
        XCTAssertEqual(try roundTrip(type: 8, block: block), expected)
    }

    func testQ4_0Block() throws {
        // d = 2 (0x4000); byte j holds value j (low nibble) and 15 - j (high nibble).
        var block = GGUFBuilder.le(UInt16(0x4000))
        let nibbles: [UInt8] = (0..<16).map { (j: Int) -> UInt8 in UInt8(j) | (UInt8(15 - j) << 4) }
        block += Data(nibbles)
        let low: [Float] = (0..<16).map { (j: Int) -> Float in Float(j - 8) * 2 }
        let high: [Float] = (0..<16).map { (j: Int) -> Float in Float(15 - j - 8) * 2 }
        let expected = low + high
        XCTAssertEqual(try roundTrip(type: 2, block: block), expected)
    }

    func testQ4_1Block() throws {
        // d = 0.25 (0x3400), m = -1 (0xBC00): x = q * 0.25 - 1.
        var block = GGUFBuilder.le(UInt16(0x3400))
        block += GGUFBuilder.le(UInt16(0xBC00))
        let nibbles: [UInt8] = (0..<16).map { (j: Int) -> UInt8 in UInt8(j) | (UInt8((j * 7) % 16) << 4) }
        block += Data(nibbles)
        let low: [Float] = (0..<16).map { (j: Int) -> Float in Float(j) * 0.25 - 1 }
        let high: [Float] = (0..<16).map { (j: Int) -> Float in Float((j * 7) % 16) * 0.25 - 1 }
        let expected = low + high
        XCTAssertEqual(try roundTrip(type: 3, block: block), expected)
    }

    func testQ4_KBlockAllScalesOne() throws {
        // d = 1, dmin = 0.5; scales: the 6-bit scales of sub-blocks 0..7 are all 1 and mins all 2.
        var block = GGUFBuilder.le(UInt16(0x3C00))
        block += GGUFBuilder.le(UInt16(0x3800))
        // j < 4: scale = s[j] & 63, min = s[j+4] & 63; j >= 4: scale = (s[j+4] & 15) | (s[j-4] >> 6) << 4, min = (s[j+4] >> 4) | (s[j] >> 6) << 4.
        block += Data([1, 1, 1, 1, 2, 2, 2, 2, 0x21, 0x21, 0x21, 0x21])
        let qs: [UInt8] = (0..<128).map { (j: Int) -> UInt8 in UInt8(j % 16) | (UInt8((j + 3) % 16) << 4) }
        block += Data(qs)
        var expected: [Float] = []
        for chunk in 0..<4 {
            for l in 0..<32 { expected.append(Float((chunk * 32 + l) % 16) - 1) }
            for l in 0..<32 { expected.append(Float((chunk * 32 + l + 3) % 16) - 1) }
        }
        XCTAssertEqual(try roundTrip(type: 12, block: block, count: 256), expected)
    }

    func testQ6_KBlock() throws {
        // ql bytes 0x21 (low nibble 1, high 2), qh bytes 0xE4 (2-bit fields 0, 1, 2, 3),
        // 16 int8 scales of 2, d = 0.5: each quarter of 32 values is (nibbles | high bits << 4) - 32.
        var block = Data(repeating: 0x21, count: 128)
        block += Data(repeating: 0xE4, count: 64)
        block += Data(repeating: 2, count: 16)
        block += GGUFBuilder.le(UInt16(0x3800))
        let quarter: [Float] = [-31, -15, 2, 18]
        var expected: [Float] = []
        for _ in 0..<2 { for q in quarter { expected += [Float](repeating: q, count: 32) } }
        XCTAssertEqual(try roundTrip(type: 14, block: block, count: 256), expected)
    }

    func testHuggingFaceNames() {
        XCTAssertEqual(GGUFCheckpoint.huggingFaceName("blk.7.ffn_gate.weight"), "model.layers.7.mlp.gate_proj.weight")
        XCTAssertEqual(GGUFCheckpoint.huggingFaceName("blk.0.attn_output.weight"), "model.layers.0.self_attn.o_proj.weight")
        XCTAssertEqual(GGUFCheckpoint.huggingFaceName("blk.3.ffn_norm.weight"), "model.layers.3.post_attention_layernorm.weight")
        XCTAssertEqual(GGUFCheckpoint.huggingFaceName("token_embd.weight"), "model.embed_tokens.weight")
        XCTAssertEqual(GGUFCheckpoint.huggingFaceName("output_norm.weight"), "model.norm.weight")
        XCTAssertEqual(GGUFCheckpoint.huggingFaceName("rope_freqs.weight"), "rope_freqs.weight")
    }

    func testUnpermuteInvertsLlamaCppPermutation() throws {
        let rows = 12, cols = 5, heads = 3
        let w = randomFloats(rows * cols, seed: 9)
        let permuted = llamaCppPermute(w, rows: rows, cols: cols, heads: heads)
        XCTAssertNotEqual(permuted, w)
        XCTAssertEqual(try GGUFCheckpoint.unpermuteRows(permuted, shape: [rows, cols], heads: heads), w)
        XCTAssertEqual(GGUFCheckpoint.permuteRows(w, shape: [rows, cols], heads: heads), permuted)
    }

    func testLlamaGGUFReadsAsHuggingFace() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("m.gguf")
        let hf = try writeLlamaGGUF(to: url)
        let c = try GGUFCheckpoint(path: url.path)
        XCTAssertEqual(Set(c.tensors.map(\.name)), Set(hf.map(\.0)))
        for (name, shape, values) in hf {
            XCTAssertEqual(c.descriptor(name)?.shape, shape, name)
            XCTAssertEqual(try c.floats(name), values, "\(name) (Q/K rows un-permuted)")
        }
        let d = try ArchitectureAdapter.describe(c)
        XCTAssertEqual(d.architecture, .llama)
        XCTAssertEqual(d.layerCount, 2)
        XCTAssertEqual(d.hidden, 16)
        XCTAssertEqual(d.ffn, 32)
        XCTAssertEqual(d.config["num_key_value_heads"]?.intValue, 1)
        XCTAssertEqual(d.config["rope_theta"], .number("100000.0"))
        XCTAssertEqual(d.config["rms_norm_eps"], .number("1e-05"))
        XCTAssertEqual(d.config["tie_word_embeddings"], .bool(true))
    }

    func testBadMagic() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("x.gguf")
        var d = GGUFBuilder().build()
        d[0] = UInt8(ascii: "X")
        try d.write(to: url)
        XCTAssertThrowsError(try GGUFFile(path: url.path)) { XCTAssertTrue("\($0)".contains("bad magic"), "\($0)") }
        XCTAssertThrowsError(try openCheckpoint(path: url.path)) { XCTAssertTrue("\($0)".contains("bad magic"), "\($0)") }
    }

    func testTruncatedTensorData() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("t.gguf")
        var b = GGUFBuilder()
        b.addString("general.architecture", "llama")
        b.tensors = [("blk.0.ffn_up.weight", [64, 4], 0, f32Data(randomFloats(256, seed: 1)))]
        let full = b.build()
        try full.prefix(full.count - 100).write(to: url)
        XCTAssertThrowsError(try GGUFFile(path: url.path)) { XCTAssertTrue("\($0)".contains("runs past the end"), "\($0)") }
        // A header cut in the middle of the metadata is also caught.
        try full.prefix(40).write(to: url)
        XCTAssertThrowsError(try GGUFFile(path: url.path)) { XCTAssertTrue("\($0)".contains("truncated"), "\($0)") }
    }

    func testUnsupportedTypeAndVersion() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("t.gguf")
        var b = GGUFBuilder()
        b.tensors = [("a", [256], 10, Data(count: 84))]  // Q2_K
        try b.build().write(to: url)
        XCTAssertThrowsError(try GGUFFile(path: url.path)) { XCTAssertTrue("\($0)".contains("ggml type 10"), "\($0)") }
        b.tensors = []
        b.version = 1
        try b.build().write(to: url)
        XCTAssertThrowsError(try GGUFFile(path: url.path)) { XCTAssertTrue("\($0)".contains("version 1"), "\($0)") }
    }
}
