import Foundation
import XCTest
import MoETestSupport
@testable import MoECheckpoint

/// `moe-gpu train --task lm`: a tiny run end to end, and one clear error (non-zero
/// exit, nothing written) for each kind of bad input.
final class LMCommandTests: XCTestCase {
    static let tinyConfig = """
        {"task": "lm", "seqLen": 16, "batchSize": 2, "steps": 3, "warmupSteps": 1, "evalEvery": 0, "testExamples": 2,
         "labelSmoothing": 0, "augment": false,
         "lm": {"vocabSize": 259, "hidden": 16, "intermediate": 24, "layers": 2, "heads": 2, "kvHeads": 1,
                "maxPositions": 64, "tokenizer": "byte", "eosID": 257, "padID": 258, "bosID": 256,
                "moeLayers": [1], "moe": {"router": "topk", "experts": 4, "topK": 2}}}
        """

    func testTinyRunWritesItsOutputsAndResumes() throws {
        let dir = try makeTempDir(self)
        let text = dir.appendingPathComponent("text.txt"), config = dir.appendingPathComponent("tiny.json")
        try Data(String(repeating: "To be, or not to be: that is the question.\n", count: 20).utf8).write(to: text)
        try Data(Self.tinyConfig.utf8).write(to: config)
        let out = dir.appendingPathComponent("run")
        let r = try runCLI(["train", "--task", "lm", "--config", config.path, "--data", text.path, "--out", out.path, "--device", "cpu"])
        XCTAssertEqual(r.status, 0, r.err + r.out)
        XCTAssertTrue(r.out.contains("validation loss"), r.out)
        for f in ["config.json", "metrics.jsonl", "model.safetensors", "checkpoints", "eval.json"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: out.appendingPathComponent(f).path), f)
        }
        let eval = try JSONSerialization.jsonObject(with: Data(contentsOf: out.appendingPathComponent("eval.json"))) as! [String: Any]
        let loss = try XCTUnwrap(eval["eval_loss"] as? Double), ppl = try XCTUnwrap(eval["perplexity"] as? Double)
        XCTAssertEqual(ppl, exp(loss), accuracy: 1e-6 * ppl)
        let resumed = try runCLI(["train", "--resume", out.path, "--steps", "5", "--device", "cpu"])
        XCTAssertEqual(resumed.status, 0, resumed.err + resumed.out)
        XCTAssertTrue(resumed.out.contains("at step 3 of 5"), resumed.out)
        let lines = try String(contentsOf: out.appendingPathComponent("metrics.jsonl")).split(separator: "\n")
        // logEvery 10: the last step of each run.
        XCTAssertEqual(lines.count, 2)
        XCTAssertTrue(lines.last!.contains("\"step\":5"), String(lines.last!))
    }

    /// Runs `train --task lm ARGS --out DIR`: non-zero exit, one error line containing `expected`, DIR never created.
    func expectError(_ args: [String], _ expected: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let dir = try makeTempDir(self), out = dir.appendingPathComponent("run")
        let r = try runCLI(["train", "--task", "lm"] + args + ["--out", out.path, "--device", "cpu"])
        XCTAssertNotEqual(r.status, 0, file: file, line: line)
        let errorLines = r.err.split(separator: "\n").filter { $0.hasPrefix("Error") }
        XCTAssertEqual(errorLines.count, 1, r.err, file: file, line: line)
        XCTAssertTrue(r.err.contains(expected), "expected '\(expected)' in: \(r.err)", file: file, line: line)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path), "a failed run left \(out.path)", file: file, line: line)
    }

    func testGGUFOfAnotherArchitecture() throws {
        var b = GGUFBuilder()
        b.addString("general.architecture", "gpt2")
        let file = try makeTempDir(self).appendingPathComponent("gpt2.gguf")
        try b.build().write(to: file)
        try expectError(["--init", file.path, "--upcycle", "replicate"], "architecture \"gpt2\" is not supported")
    }

    func testCheckpointWithoutTokenizer() throws {
        let file = try makeTempDir(self).appendingPathComponent("llama.gguf")
        _ = try writeLlamaGGUF(to: file)
        try expectError(["--init", file.path, "--upcycle", "replicate"], "has no tokenizer")
    }

    func testTextThatIsNotUTF8() throws {
        let file = try makeTempDir(self).appendingPathComponent("latin1.txt")
        try Data([0x48, 0x69, 0x20, 0xE9, 0x74, 0xE9]).write(to: file)
        try expectError(["--init", "scratch", "--data", file.path], "not valid UTF-8 at byte 3")
    }

    func testSequenceLongerThanTheContext() throws {
        try expectError(["--init", "scratch", "--seq-len", "100000"], "lower --seq-len")
    }

    func testTopKAboveExperts() throws {
        try expectError(["--init", "scratch", "--experts", "2", "--top-k", "3"], "topK 3 must be in 1...2")
    }
}
