import Foundation
@testable import MoEModel
import XCTest

/// Replays the fuzzers' seeds (Tests/Fuzz/corpus) and every input a fuzzer ever
/// found a fault with (Tests/Fuzz/regressions) through the same reader calls:
/// each is accepted or rejected with a one-line error, never a crash.
final class ReaderFuzzingTests: XCTestCase {
    static let fuzzFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fuzz")

    func testSeedsAndRegressionInputsAreReadOrRejectedInOneLine() throws {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("fuzz-replay-\(UUID().uuidString)")
        var replayed = 0, accepted = 0
        for kind in ["corpus", "regressions"] {
            for target in ReaderFuzzing.targets {
                let dir = Self.fuzzFolder.appendingPathComponent(kind).appendingPathComponent(target)
                for name in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] {
                    let data = try Data(contentsOf: dir.appendingPathComponent(name))
                    do { try ReaderFuzzing.read(target, data, scratch: scratch); accepted += 1 } catch {
                        XCTAssertFalse("\(error)".contains("\n"), "\(kind)/\(target)/\(name): a multi-line error: \(error)")
                        if kind == "corpus" { XCTFail("the seed \(target)/\(name) is a real file and must be accepted: \(error)") }
                    }
                    replayed += 1
                }
            }
        }
        for ext in ["safetensors", "gguf", "idx", "idx2", "csv", "json", "yaml"] { try? FileManager.default.removeItem(at: scratch.appendingPathExtension(ext)) }
        XCTAssertGreaterThanOrEqual(replayed, 10)
        XCTAssertGreaterThanOrEqual(accepted, 9, "every seed reads")
    }
}
