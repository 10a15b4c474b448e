import Foundation
import XCTest
@testable import MoECheckpoint

/// The `moe-gpu` binary on bad input: one clear error line, non-zero exit, no output file.
final class CheckpointCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: moeGPUBinary().path),
                          "moe-gpu binary not found next to the test bundle at \(moeGPUBinary().path); build it with swift build")
        dir = try makeTempDir(self)
    }

    /// Runs `upcycle` (and `inspect`) on `input`; both must fail with one line naming `fragment`.
    func expectFailure(input: URL, _ fragment: String, extra: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws {
        let out = dir.appendingPathComponent("out")
        let before = filesIn(dir)
        let r = try runCLI(["upcycle", "--from", input.path, "--to", out.path] + extra)
        XCTAssertNotEqual(r.status, 0, file: file, line: line)
        let lines = r.err.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "one error line, got: \(r.err)", file: file, line: line)
        XCTAssertTrue(r.err.contains(fragment), "\(r.err) should mention \(fragment)", file: file, line: line)
        XCTAssertEqual(filesIn(dir), before, "no output file", file: file, line: line)
        if extra.isEmpty {
            let i = try runCLI(["inspect", input.path])
            XCTAssertNotEqual(i.status, 0, file: file, line: line)
            XCTAssertTrue(i.err.contains(fragment), i.err, file: file, line: line)
        }
    }

    func write(_ data: Data, _ name: String = "bad.safetensors") throws -> URL {
        let url = dir.appendingPathComponent(name)
        try data.write(to: url)
        return url
    }

    let good = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#

    func testTruncatedFile() throws {
        try expectFailure(input: write(rawSafetensors(header: good, buffer: Data(count: 4))), "truncated")
    }
    func testHeaderLengthPastEnd() throws {
        try expectFailure(input: write(rawSafetensors(header: good, buffer: Data(), headerLength: 4000)), "past the end")
    }
    func testHeaderOver100MB() throws {
        try expectFailure(input: write(rawSafetensors(header: good, buffer: Data(), headerLength: 200_000_000)), "100,000,000")
    }
    func testHolesAndOverlaps() throws {
        let hole = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#
        try expectFailure(input: write(rawSafetensors(header: hole, buffer: Data(count: 12))), "hole")
        let overlap = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        try expectFailure(input: write(rawSafetensors(header: overlap, buffer: Data(count: 8))), "overlaps")
    }
    func testSizeMismatch() throws {
        let h = #"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#
        try expectFailure(input: write(rawSafetensors(header: h, buffer: Data(count: 8))), "needs 6")
    }
    func testInvalidJSON() throws {
        try expectFailure(input: write(rawSafetensors(header: "{\"a\": [1, 2", buffer: Data())), "not valid JSON")
    }
    func testNonUTF8Header() throws {
        var d = rawSafetensors(header: good, buffer: Data(count: 8))
        d[9] = 0xC3; d[10] = 0x28
        try expectFailure(input: write(d), "UTF-8")
    }
    func testDuplicateNames() throws {
        let h = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        try expectFailure(input: write(rawSafetensors(header: h, buffer: Data(count: 8))), "duplicate")
    }
    func testUnknownDtype() throws {
        let h = #"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#
        try expectFailure(input: write(rawSafetensors(header: h, buffer: Data(count: 8))), "unknown dtype")
    }
    func testGGUFBadMagic() throws {
        var d = GGUFBuilder().build()
        d[3] = 0
        try expectFailure(input: write(d, "m.gguf"), "bad magic")
    }
    func testGGUFTruncatedTensorData() throws {
        let url = dir.appendingPathComponent("m.gguf")
        _ = try writeLlamaGGUF(to: url)
        let full = try Data(contentsOf: url)
        try full.prefix(full.count - 64).write(to: url)
        try expectFailure(input: url, "runs past the end")
    }
    func testTopKLargerThanExperts() throws {
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense)
        try expectFailure(input: dense, "--top-k 3 must be between 1 and --experts 2", extra: ["--experts", "2", "--top-k", "3"])
    }
    func testGranularityNotDividingFFN() throws {
        let dense = dir.appendingPathComponent("bert.safetensors")
        try writeBertLike(to: dense)
        try expectFailure(input: dense, "--granularity 5 does not divide the FFN width 24",
                          extra: ["--method", "granular", "--granularity", "5", "--experts", "10", "--top-k", "5"])
    }
    func testUnknownLayout() throws {
        let url = dir.appendingPathComponent("x.safetensors")
        try writeSafetensors(to: url, tensors: [tensor("conv.weight", [2, 2], seed: 1)])
        try expectFailure(input: url, "supported architectures are BERT")
    }

    func testUpcycleAndInspectSucceed() throws {
        let dense = try writeLlamaLike(in: dir.appendingPathComponent("llama"))
        let out = dir.appendingPathComponent("mixtral")
        let r = try runCLI(["upcycle", "--from", dense.path, "--to", out.path, "--experts", "4", "--top-k", "2", "--verify"])
        XCTAssertEqual(r.status, 0, r.err)
        XCTAssertTrue(r.out.contains("verify: PASS"), r.out)
        XCTAssertEqual(filesIn(out), ["config.json", "model.safetensors"])
        let i = try runCLI(["inspect", out.path, "--json"])
        XCTAssertEqual(i.status, 0, i.err)
        let j = try JSONParser.parse(Array(i.out.utf8))
        XCTAssertEqual(j["architecture"], .string("mixtral"))
        XCTAssertEqual(j["routing"]?["top_k"]?.intValue, 2)
        XCTAssertEqual(j["moe_layers"]?.arrayValue?.count, 2)
        XCTAssertEqual(j["moe_layers"]?.arrayValue?.first?["experts"]?.intValue, 4)
    }
}
