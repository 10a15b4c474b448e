import Foundation
import MoECheckpoint
import MoECompute
@testable import MoEModel
import MoETokenizer
import XCTest
import MoETestSupport

/// The real SmolLM2-135M-Instruct (GGUF Q4_1, fetched by scripts/fetch-checkpoints.sh):
/// online upcycling at load keeps the dense model's logits at step 0.
final class SmolLM2Tests: XCTestCase {
    static let file = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"

    static func checkpoint() throws -> String {
        try fetchedCache(script: "fetch-checkpoints.sh", cacheVariable: "MOE_GPU_CHECKPOINTS", defaultFolder: "checkpoints",
                         what: "the SmolLM2 checkpoint is") { FileManager.default.fileExists(atPath: $0.appendingPathComponent(file).path) }
            .appendingPathComponent(file).path
    }

    static let text = """
        To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer \
        The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles \
        And by opposing end them. In 1603 the play was printed; ça coûte 12,50 € — 漢字 🙂.
        """

    /// Dense logits, then the same text through the MoE built at load time from the same file.
    func checkUpcycle(backend: Backend) throws {
        let path = try Self.checkpoint()
        let (source, dense) = try LlamaCheckpoint.open(path)
        XCTAssertEqual(dense.layers, 30)
        XCTAssertEqual(dense.heads, 9)
        XCTAssertEqual(dense.kvHeads, 3)
        XCTAssertEqual(dense.intermediate, 1536)
        let tokenizer = try ByteLevelBPETokenizer(gguf: path)
        let ids = tokenizer.encode(Self.text)
        XCTAssertGreaterThan(ids.count, 50)
        let inputs = try backend.tensor(ints: ids, shape: [1, ids.count])
        var want: [Double]
        do {
            let model = try LlamaModel(config: dense, backend: backend, seed: 0, training: false, initialize: false)
            try LlamaCheckpoint.load(source, into: model)
            want = try model.forward(inputs, training: false, step: 0).floats().map(Double.init)
        }
        // Replicate: 8 copies, top-2. Granular: 2 copies x 4 shards, top-4 (one copy's shards).
        for (method, topK, g) in [(LMUpcycleMethod.replicate, 2, 1), (.granular, 4, 4)] {
            var c = dense
            var moe = LMRecipe.mixtralMoE(experts: 8, topK: topK)
            moe.expertWidthRatio = 1 / Double(g)
            c.moe = moe
            c.moeLayers = Array(0..<c.layers)
            let model = try LlamaModel(config: c, backend: backend, seed: 0, training: false, initialize: false)
            let log = try LlamaCheckpoint.load(source, into: model, upcycle: LMUpcycleOptions(method: method, granularity: g, seed: 3))
            XCTAssertEqual(log.count, 30)
            let got = try model.forward(inputs, training: false, step: 0).floats()
            assertRelativeError(got, want, below: 1e-5, "SmolLM2 \(method) G=\(g) top-\(topK) logits vs dense on \(backend.name)")
        }
        // And the dense model predicts real text: its next-token loss is far below uniform (ln 49152 = 10.8).
        let n = ids.count - 1
        var loss = 0.0
        for t in 0..<n {
            let row = want[(t * dense.vocabSize)..<((t + 1) * dense.vocabSize)]
            let m = row.max()!
            loss += log(row.reduce(0.0) { $0 + exp($1 - m) }) + m - row[row.startIndex + Int(ids[t + 1])]
        }
        XCTAssertLessThan(loss / Double(n), 4.5)
    }

    func testUpcycleAtLoadKeepsTheDenseLogits() throws { try checkUpcycle(backend: CPUBackend()) }
    func testUpcycleAtLoadKeepsTheDenseLogitsOnOpenCL() throws { try checkUpcycle(backend: try TestBackends.openCLOrSkip()) }
}
