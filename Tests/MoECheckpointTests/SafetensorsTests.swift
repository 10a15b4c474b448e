import Foundation
import XCTest
@testable import MoECheckpoint

final class SafetensorsTests: XCTestCase {
    func testWriteReadRoundTripWithMetadataAndPadding() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("a.safetensors")
        let a = randomFloats(12, seed: 1), b = randomFloats(5, seed: 2)
        let ints: [Int64] = [3, -1, 7]
        try writeSafetensors(to: url, tensors: [("a", .F32, [3, 4], f32Data(a)), ("scalar", .F32, [], f32Data([2.5])),
                                                ("empty", .F32, [0, 3], Data()), ("b", .F32, [5], f32Data(b)),
                                                ("ids", .I64, [3], ints.withUnsafeBytes { Data($0) })],
                             metadata: ["format": "pt", "note": "x\"y"])
        let raw = try Data(contentsOf: url)
        let n = raw.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
        XCTAssertEqual(n % 8, 0, "header must be padded to a multiple of 8")
        XCTAssertEqual(raw[8 + Int(n) - 1], 0x20, "padding is spaces")
        let f = try SafetensorsFile(path: url.path)
        XCTAssertEqual(f.metadata, ["format": "pt", "note": "x\"y"])
        XCTAssertEqual(f.entries.map(\.name), ["a", "scalar", "empty", "b", "ids"])
        XCTAssertEqual(try f.floats("a"), a)
        XCTAssertEqual(try f.floats("scalar"), [2.5])
        XCTAssertEqual(try f.floats("empty"), [])
        XCTAssertEqual(try f.floats("b"), b)
        XCTAssertEqual(f.entry("ids")?.dtype, .I64)
        XCTAssertEqual(Array(f.rawBytes(f.entry("ids")!).bindMemory(to: Int64.self)), ints)
        XCTAssertThrowsError(try f.floats("ids")) { XCTAssertTrue("\($0)".contains("I64")) }
        XCTAssertEqual(filesIn(dir), ["a.safetensors"], "no temporary file is left")
    }

    func testF16AndBF16ConvertExactly() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("h.safetensors")
        // Hand-encoded halves: 1.0, -2.0, 0.5, 65504, smallest subnormal, -0.
        let f16: [UInt16] = [0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x8000]
        let f16Expected: [Float] = [1, -2, 0.5, 65504, 5.9604645e-08, -0.0]
        // bfloat16: 1.0, -3.0, 1/128, pi truncated (0x4049 = 3.140625).
        let bf16: [UInt16] = [0x3F80, 0xC040, 0x3C00, 0x4049]
        let bfExpected: [Float] = [1, -3, 0.0078125, 3.140625]
        try writeSafetensors(to: url, tensors: [("h", .F16, [6], f16.withUnsafeBytes { Data($0) }),
                                                ("b", .BF16, [2, 2], bf16.withUnsafeBytes { Data($0) })])
        let f = try SafetensorsFile(path: url.path)
        XCTAssertEqual(try f.floats("h"), f16Expected)
        XCTAssertEqual(try f.floats("b"), bfExpected)
        XCTAssertEqual(HalfConversion.f32ToBF16(3.14159265), 0x4049)
        XCTAssertEqual(HalfConversion.f32ToBF16(1.00390625), 0x3F80, "ties round to even")
        XCTAssertEqual(HalfConversion.f32ToF16(0.5), 0x3800)
        XCTAssertEqual(Array(encodeFloats([1, -3], as: .BF16)), [0x80, 0x3F, 0x40, 0xC0])
        XCTAssertEqual(Array(encodeFloats([0.5], as: .F16)), [0x00, 0x38])
        XCTAssertEqual(encodeFloats([2.5], as: .F32), f32Data([2.5]))
    }

    func testShardedIndex() throws {
        let dir = try makeTempDir(self)
        try writeSafetensors(to: dir.appendingPathComponent("model-00001-of-00002.safetensors"), tensors: [tensor("x", [2, 2], seed: 3)])
        try writeSafetensors(to: dir.appendingPathComponent("model-00002-of-00002.safetensors"), tensors: [tensor("y", [3], seed: 4)])
        try Data(#"{"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#.utf8)
            .write(to: dir.appendingPathComponent("model.safetensors.index.json"))
        let c = try SafetensorsCheckpoint(path: dir.path)
        XCTAssertEqual(c.files.count, 2)
        XCTAssertEqual(c.tensors.map(\.name).sorted(), ["x", "y"])
        XCTAssertEqual(try c.floats("y"), randomFloats(3, seed: 4, scale: 0.5))
        // An index that claims a tensor the shard lacks is an error.
        try Data(#"{"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors", "z": "model-00002-of-00002.safetensors"}}"#.utf8)
            .write(to: dir.appendingPathComponent("model.safetensors.index.json"))
        XCTAssertThrowsError(try SafetensorsCheckpoint(path: dir.path)) { XCTAssertTrue("\($0)".contains("z")) }
        // Shards of two training steps (a run folder's links caught half-way) are refused.
        try Data(#"{"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#.utf8)
            .write(to: dir.appendingPathComponent("model.safetensors.index.json"))
        try writeSafetensors(to: dir.appendingPathComponent("model-00001-of-00002.safetensors"), tensors: [tensor("x", [2, 2], seed: 3)], metadata: ["step": "4"])
        try writeSafetensors(to: dir.appendingPathComponent("model-00002-of-00002.safetensors"), tensors: [tensor("y", [3], seed: 4)], metadata: ["step": "4"])
        XCTAssertNoThrow(try SafetensorsCheckpoint(path: dir.path))
        try writeSafetensors(to: dir.appendingPathComponent("model-00002-of-00002.safetensors"), tensors: [tensor("y", [3], seed: 4)], metadata: ["step": "2"])
        XCTAssertThrowsError(try SafetensorsCheckpoint(path: dir.path)) { XCTAssertTrue("\($0)".contains("different training steps (2, 4)"), "\($0)") }
    }

    func testStreamWriterLeavesNothingWhenAbandoned() throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("out.safetensors")
        do {
            let w = try SafetensorsStreamWriter(url: url, tensors: [PlannedTensor(name: "a", dtype: .F32, shape: [2]),
                                                                   PlannedTensor(name: "b", dtype: .F32, shape: [2])], metadata: [:])
            try w.write("a", floats: [1, 2])
            XCTAssertThrowsError(try w.write("a", floats: [1, 2]), "out of order")
            XCTAssertThrowsError(try w.finish(), "b was never written")
        }
        XCTAssertEqual(filesIn(dir), [], "no output and no temporary file")
    }

    // MARK: malformed files: each is rejected with a message naming the problem.

    func expectRejected(_ data: Data, _ fragment: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let dir = try makeTempDir(self)
        let url = dir.appendingPathComponent("bad.safetensors")
        try data.write(to: url)
        XCTAssertThrowsError(try SafetensorsFile(path: url.path), file: file, line: line) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains(fragment), "\(text) should mention \(fragment)", file: file, line: line)
            XCTAssertFalse(text.contains("\n"), "one line", file: file, line: line)
        }
    }

    let good = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#

    func testTruncatedFile() throws {
        try expectRejected(Data([1, 2, 3]), "shorter than the 8-byte header")
        // Valid header, buffer cut short.
        try expectRejected(rawSafetensors(header: good, buffer: Data(count: 5)), "truncated")
    }

    func testHeaderLengthPastEnd() throws {
        try expectRejected(rawSafetensors(header: good, buffer: Data(count: 8), headerLength: 500), "past the end")
    }

    func testHeaderOver100MB() throws {
        try expectRejected(rawSafetensors(header: good, buffer: Data(count: 8), headerLength: 100_000_001), "100,000,000")
    }

    func testHoleBetweenOffsets() throws {
        let h = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#
        try expectRejected(rawSafetensors(header: h, buffer: Data(count: 12)), "hole")
    }

    func testOverlappingOffsets() throws {
        let h = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        try expectRejected(rawSafetensors(header: h, buffer: Data(count: 8)), "overlaps")
    }

    func testSizeNotMatchingShape() throws {
        let h = #"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#
        try expectRejected(rawSafetensors(header: h, buffer: Data(count: 8)), "needs 12")
        // A shape whose byte size overflows 64 bits.
        let o = #"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#
        try expectRejected(rawSafetensors(header: o, buffer: Data(count: 8)), "overflows")
    }

    func testInvalidJSON() throws {
        try expectRejected(rawSafetensors(header: #"{"a":{"dtype":"F32",}"#, buffer: Data()), "not valid JSON")
    }

    func testNonUTF8Header() throws {
        var d = rawSafetensors(header: good, buffer: Data(count: 8))
        d[10] = 0xFF
        try expectRejected(d, "UTF-8")
    }

    func testDuplicateNames() throws {
        let h = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        try expectRejected(rawSafetensors(header: h, buffer: Data(count: 8)), "duplicate tensor name")
    }

    func testUnknownDtype() throws {
        let h = #"{"a":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}"#
        try expectRejected(rawSafetensors(header: h, buffer: Data(count: 8)), "unknown dtype \"F7\"")
    }

    func testEndBeforeBegin() throws {
        let h = #"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"c":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#
        try expectRejected(rawSafetensors(header: h, buffer: Data()), "hole")
    }
}
