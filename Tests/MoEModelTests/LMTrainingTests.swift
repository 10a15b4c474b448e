import Foundation
import MoECompute
@testable import MoEModel
import MoETokenizer
import XCTest
import MoETestSupport

/// Training a decoder LM through the one trainer.
final class LMTrainingTests: XCTestCase {
    static let text = String(repeating: """
        Shall I compare thee to a summer's day? Thou art more lovely and more temperate: \
        Rough winds do shake the darling buds of May, And summer's lease hath all too short a date.

        """, count: 6)

    func trainConfig(moe: Bool) -> TrainConfig {
        var t = smallLMTrainConfig(moe: moe, hidden: 32, intermediate: 48)
        t.seqLen = 24; t.batchSize = 4; t.steps = 20; t.warmupSteps = 5; t.learningRate = 3e-3
        t.labelSmoothing = 0; t.testExamples = 4
        return t
    }

    func sources(seqLen: Int) throws -> (LMBatchSource, LMBatchSource) {
        let corpus = try TokenizedCorpus(documents: [.text(Self.text)], tokenizer: ByteTokenizer())
        return (try LMBatchSource(corpus, seqLen: seqLen), try LMBatchSource(corpus, seqLen: seqLen))
    }

    func lossCurve(_ t: TrainConfig, backend: Backend) throws -> [Float] {
        let model = try LlamaModel(config: t.lm!, backend: backend, seed: 4, sequenceLength: t.seqLen)
        let (train, test) = try sources(seqLen: t.seqLen)
        let trainer = try Trainer(config: t, model: model, train: train, test: test)
        return try (0..<t.steps).map { _ in try trainer.trainStep().loss }
    }

    func testLossFallsOnTheCPU() throws {
        for moe in [false, true] {
            let curve = try lossCurve(trainConfig(moe: moe), backend: CPUBackend())
            XCTAssertLessThan(curve.last!, curve.first! - 1, "moe \(moe): \(curve)")
        }
    }

    /// The bar: PoCL and the CPU backend give the same 20-step LM loss curve to 1e-4.
    func testOpenCLLossCurveMatchesCPU() throws {
        let opencl = try TestBackends.openCLOrSkip()
        for moe in [false, true] {
            let t = trainConfig(moe: moe)
            let cpu = try lossCurve(t, backend: CPUBackend()), gpu = try lossCurve(t, backend: opencl)
            for (i, (a, b)) in zip(cpu, gpu).enumerated() {
                XCTAssertLessThan(abs(a - b) / abs(a), 1e-4, "moe \(moe) step \(i + 1): CPU \(a) vs OpenCL \(b)")
            }
        }
    }

    /// Evaluation counts every predicted token of the windows, not one per window.
    func testEvaluationAveragesOverTargets() throws {
        let t = trainConfig(moe: false)
        let backend = CPUBackend()
        let model = try LlamaModel(config: t.lm!, backend: backend, seed: 4, sequenceLength: t.seqLen)
        let (train, test) = try sources(seqLen: t.seqLen)
        let trainer = try Trainer(config: t, model: model, train: train, test: test)
        let r = try trainer.evaluateCounts(limit: 3)
        XCTAssertEqual(r.targets, (0..<3).reduce(0) { $0 + test.targetCount(window: $1) })
        // An untrained model is close to uniform over the 259 ids.
        XCTAssertEqual(r.lossSum / Double(r.targets), log(259), accuracy: 0.2)
    }
}
