import Foundation
import XCTest
import MoETestSupport
@testable import MoECheckpoint

/// Tests on the two real checkpoints fetched by scripts/fetch-checkpoints.sh.
/// They fetch the files when missing and skip only when that is impossible.
final class RealCheckpointTests: XCTestCase {
    static let minilm = "all-minilm-l6-v2/model.safetensors"
    static let smollm = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"

    /// The cache folder holding both checkpoints, fetching them if needed.
    func checkpoints() throws -> URL {
        try fetchedCache(script: "fetch-checkpoints.sh", cacheVariable: "MOE_GPU_CHECKPOINTS", defaultFolder: "checkpoints",
                         what: "real checkpoints are") { base in
            [Self.minilm, Self.smollm].allSatisfy { FileManager.default.fileExists(atPath: base.appendingPathComponent($0).path) }
        }
    }

    func testMiniLMInspectAndUpcycleEveryLayer() throws {
        let base = try checkpoints()
        let path = base.appendingPathComponent(Self.minilm).path
        let s = try CheckpointSummary(path: path)
        XCTAssertEqual(s.description.architecture, .bert)
        XCTAssertEqual(s.description.layerCount, 6)
        XCTAssertEqual(s.description.hidden, 384)
        XCTAssertEqual(s.description.ffn, 1536)
        XCTAssertEqual(s.dtypes, ["F32": 103, "I64": 1])
        XCTAssertEqual(s.parameters, 22_713_216)

        let dir = try makeTempDir(self)
        var o = UpcycleOptions()
        o.experts = 8; o.topK = 2; o.verify = true; o.verifyTokens = 4
        let r = try Upcycler(options: o).run(from: path, to: dir.appendingPathComponent("moe").path)
        let v = try XCTUnwrap(r.verification)
        XCTAssertEqual(r.layers, Array(0..<6))
        XCTAssertTrue(v.passed)
        XCTAssertLessThan(v.maxRelativeDifference, 1e-6)
        let moe = try CheckpointSummary(path: r.checkpoint.path)
        XCTAssertEqual(moe.description.moeLayers.count, 6)
        XCTAssertEqual(moe.description.moeLayers[5]?.experts, 8)
    }

    func testSmolLM2InspectAndUpcycleTwoLayers() throws {
        let base = try checkpoints()
        let path = base.appendingPathComponent(Self.smollm).path
        let s = try CheckpointSummary(path: path)
        XCTAssertEqual(s.description.architecture, .llama)
        XCTAssertEqual(s.description.layerCount, 30)
        XCTAssertEqual(s.description.hidden, 576)
        XCTAssertEqual(s.description.ffn, 1536)
        XCTAssertEqual(s.dtypes["Q4_1"], 210)
        XCTAssertEqual(s.description.config["num_key_value_heads"]?.intValue, 3)
        XCTAssertEqual(s.description.config["tie_word_embeddings"], .bool(true))

        // The whole-model Mixtral conversion runs through the CLI (see the README);
        // here two layers in moe-gpu's own naming keep the debug test short.
        let dir = try makeTempDir(self)
        var o = UpcycleOptions()
        o.experts = 8; o.topK = 2; o.verify = true; o.verifyTokens = 4; o.format = .own; o.layers = .list([0, 29])
        let r = try Upcycler(options: o).run(from: path, to: dir.appendingPathComponent("moe.safetensors").path)
        let v = try XCTUnwrap(r.verification)
        XCTAssertTrue(v.passed)
        XCTAssertLessThan(v.maxRelativeDifference, 1e-6)
        XCTAssertEqual(v.layers.map(\.layer), [0, 29])
        let moe = try SafetensorsCheckpoint(path: r.checkpoint.path)
        XCTAssertEqual(moe.descriptor("blocks.29.moe.experts.7.down.weight")?.shape, [576, 1536])
        XCTAssertEqual(moe.descriptor("model.layers.3.self_attn.k_proj.weight")?.shape, [192, 576])
    }
}
