import Foundation
import MoECompute
@testable import MoEModel
import XCTest
import MoETestSupport

/// Fashion-MNIST from Debian's dataset-fashion-mnist, or a skip naming the install command.
func fashionMNIST() throws -> (train: ImageDataset, test: ImageDataset) {
    do { return try BuiltinData.idxFolder(BuiltinData.fashionMNISTFolder) } catch let e as DataError {
        throw XCTSkip("real-data test skipped: \(e)")
    }
}

func smallTrainConfig(router: String?) -> TrainConfig {
    var c = TrainConfig()
    c.model.width = 32; c.model.depth = 2; c.model.heads = 2; c.model.mlpRatio = 2
    if let router {
        c.model.moeBlocks = [1]
        c.model.moe = Recipe.moe(router: router, experts: 4)
        c.model.moe?.dropout = 0; c.model.moe?.stochasticDepth = 0
    }
    c.batchSize = 32; c.steps = 20; c.warmupSteps = 2; c.learningRate = 2e-3
    c.augment = false; c.evalEvery = 0; c.testExamples = 200
    return c
}

final class TrainingTests: XCTestCase {
    /// Training on real images: the loss falls and accuracy beats chance (10%) by far.
    func testTinyModelLearnsFashionMNIST() throws {
        let data = try fashionMNIST()
        var c = smallTrainConfig(router: "topk")
        c.steps = 150
        let model = try ViT(config: c.model, backend: CPUBackend(), seed: 1)
        let trainer = try Trainer(config: c, model: model, train: data.train, test: data.test)
        var losses: [Float] = []
        for _ in 0..<c.steps { losses.append(try trainer.trainStep().loss) }
        let first = losses.prefix(10).reduce(0, +) / 10, last = losses.suffix(10).reduce(0, +) / 10
        XCTAssertLessThan(last, first * 0.75, "loss should fall: \(first) -> \(last)")
        let accuracy = try trainer.evaluate(limit: 500)
        XCTAssertGreaterThan(accuracy, 0.5, "accuracy \(accuracy) should beat chance (0.1) by a wide margin")
    }

    /// The same seed gives the same loss curve on the OpenCL device (PoCL) and the CPU backend.
    func testOpenCLAndCPUGiveTheSameLossCurve() throws {
        let cl = try TestBackends.openCLOrSkip()
        let data = try fashionMNIST()
        for router in [nil, "topk", "sphero"] as [String?] {
            let c = smallTrainConfig(router: router)
            var curves: [[Float]] = []
            for backend in [CPUBackend(), cl] as [Backend] {
                let model = try ViT(config: c.model, backend: backend, seed: 2)
                let trainer = try Trainer(config: c, model: model, train: data.train, test: data.test)
                curves.append(try (0..<20).map { _ in try trainer.trainStep().loss })
            }
            for (step, (a, b)) in zip(curves[0], curves[1]).enumerated() {
                XCTAssertLessThan(abs(a - b) / abs(a), 1e-4, "\(router ?? "dense") step \(step + 1): cpu \(a) vs opencl \(b)")
            }
        }
    }

    func testSameSeedSameCurveOnOneBackend() throws {
        let data = try fashionMNIST()
        let c = smallTrainConfig(router: "sphero")
        var curves: [[Float]] = []
        for _ in 0..<2 {
            let trainer = try Trainer(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 3), train: data.train, test: data.test)
            curves.append(try (0..<5).map { _ in try trainer.trainStep().loss })
        }
        XCTAssertEqual(curves[0], curves[1])
    }

    /// A run folder resumed from its checkpoint continues exactly where it stopped.
    func testResumeContinuesTheSameRun() throws {
        let data = try fashionMNIST()
        var c = smallTrainConfig(router: "topk")
        c.steps = 6; c.evalEvery = 3; c.augment = true
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moe-gpu-resume-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let full = try TrainRun(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 4), out: dir.appendingPathComponent("full"), data: data)
        let straight = try full.run().last!.loss

        // A run stopped after step 3 (as a crash would), then resumed from its folder.
        let partDir = dir.appendingPathComponent("part")
        _ = try TrainRun(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 4), out: partDir, data: data).run(until: 3)
        let resumed = try TrainRun(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 4), out: partDir, data: data)
        try resumed.resume(from: partDir)
        XCTAssertEqual(resumed.trainer.step, 3)
        let after = try resumed.run().last!.loss
        XCTAssertEqual(after, straight, accuracy: 1e-5 * abs(straight))
        let lines = try String(contentsOf: partDir.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n")
        XCTAssertGreaterThanOrEqual(lines.count, 2)
        for line in lines { XCTAssertNoThrow(try JSONSerialization.jsonObject(with: Data(line.utf8))) }
    }

    /// Issue 11: --resume continues exactly. With every source of randomness on
    /// (augmentation, SpheroMoE's routing noise, expert dropout, stochastic depth),
    /// the loss and gradient norm of every step after the resume point equal the
    /// uninterrupted run's bit for bit on the CPU backend.
    func testResumeIsBitwiseTheUninterruptedRun() throws {
        let data = try fashionMNIST()
        var c = smallTrainConfig(router: "sphero")
        c.steps = 8; c.evalEvery = 4; c.logEvery = 1; c.augment = true
        c.model.moe!.dropout = 0.1; c.model.moe!.stochasticDepth = 0.1
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moe-gpu-resume-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        func steps(_ d: URL) throws -> [Int: [String: Any]] {
            var out: [Int: [String: Any]] = [:]
            for line in try String(contentsOf: d.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n") {
                let o = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
                out[try XCTUnwrap(o["step"] as? Int)] = o
            }
            return out
        }
        let full = dir.appendingPathComponent("full"), part = dir.appendingPathComponent("part")
        try TrainRun(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 4), out: full, data: data).run()
        _ = try TrainRun(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 4), out: part, data: data).run(until: 6)
        // Stopped at step 6 (with its checkpoint, as a Ctrl-C leaves it). A model built with
        // another seed would draw other dropout masks: refused, not silently different.
        let other = try TrainRun(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 99), out: part, data: data)
        XCTAssertThrowsError(try other.resume(from: part)) { XCTAssertTrue("\($0)".contains("seed 4, this one has seed 99"), "\($0)") }
        let resumed = try TrainRun(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 4), out: part, data: data)
        try resumed.resume(from: part)
        XCTAssertEqual(resumed.trainer.step, 6)
        try resumed.run()
        let a = try steps(full), b = try steps(part)
        XCTAssertEqual(Array(b.keys).sorted(), Array(1...8))
        for s in 7...8 {
            for key in ["loss", "grad_norm"] {
                let x = try XCTUnwrap((a[s]?[key] as? NSNumber)?.floatValue), y = try XCTUnwrap((b[s]?[key] as? NSNumber)?.floatValue)
                XCTAssertEqual(x.bitPattern, y.bitPattern, "step \(s) \(key): \(x) vs \(y)")
            }
        }
    }

    func testLearningRateScheduleWarmsUpAndDecays() {
        var c = TrainConfig()
        c.steps = 100; c.warmupSteps = 10; c.learningRate = 1; c.minLearningRate = 0.1
        XCTAssertEqual(c.learningRate(at: 5), 0.5, accuracy: 1e-6)
        XCTAssertEqual(c.learningRate(at: 10), 1, accuracy: 1e-6)
        XCTAssertEqual(c.learningRate(at: 55), 0.55, accuracy: 1e-5)
        XCTAssertEqual(c.learningRate(at: 100), 0.1, accuracy: 1e-6)
    }

    func testBadConfigsAreRejectedWithTheReason() {
        var c = TrainConfig()
        c.model.moeBlocks = [1]
        c.model.moe = MoEConfig()
        c.model.moe!.router = "hash"
        XCTAssertThrowsError(try c.validate()) { XCTAssertTrue("\($0)".contains("unknown router \"hash\"")) }
        c.model.moe!.router = "topk"; c.model.moe!.topK = 9
        XCTAssertThrowsError(try c.validate()) { XCTAssertTrue("\($0)".contains("topK 9")) }
        c = TrainConfig(); c.model.width = 30; c.model.heads = 4
        XCTAssertThrowsError(try c.validate())
    }
}

final class ConfigFileTests: XCTestCase {
    func write(_ text: String) throws -> String {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString).json")
        try text.write(to: url, atomically: true, encoding: .utf8)
        addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url.path
    }

    func testPartialConfigKeepsDefaults() throws {
        let c = try TrainRun.loadConfig(try write(#"{"steps": 7, "model": {"width": 32, "moeBlocks": [3], "moe": {"router": "topk", "experts": 4}}}"#))
        XCTAssertEqual(c.steps, 7)
        XCTAssertEqual(c.model.width, 32)
        XCTAssertEqual(c.model.depth, ViTConfig().depth)
        XCTAssertEqual(c.model.moe?.router, "topk")
        XCTAssertEqual(c.model.moe?.experts, 4)
        XCTAssertEqual(c.model.moe?.topK, Recipe.moe(router: "topk").topK)
        XCTAssertEqual(c.batchSize, TrainConfig().batchSize)
    }

    func testYAMLConfig() throws {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString).yaml")
        try "steps: 9\nlearningRate: 0.002\nmodel:\n  depth: 3\n  moeBlocks: [2]\n  moe:\n    router: expert-choice\n"
            .write(to: url, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: url) }
        let c = try TrainRun.loadConfig(url.path)
        XCTAssertEqual(c.steps, 9)
        XCTAssertEqual(c.learningRate, 0.002)
        XCTAssertEqual(c.model.depth, 3)
        XCTAssertEqual(c.model.moe?.router, "expert-choice")
        XCTAssertEqual(c.model.moe?.capacityFactor, 2)
        XCTAssertNoThrow(try c.validate())
    }

    /// Plain YAML scalars by the 1.2 core schema: no YAML 1.1 base-60 numbers (Yams's
    /// resolver trapped on "0:00:0:..." overflowing: a fuzzer finding).
    func testYAMLScalarsFollowTheCoreSchema() {
        XCTAssertEqual(coreSchemaScalar("42") as? Int, 42)
        XCTAssertEqual(coreSchemaScalar("-7") as? Int, -7)
        XCTAssertEqual(coreSchemaScalar("0x1F") as? Int, 31)
        XCTAssertEqual(coreSchemaScalar("0o17") as? Int, 15)
        XCTAssertEqual(coreSchemaScalar("2.5e-3") as? Double, 0.0025)
        XCTAssertEqual(coreSchemaScalar(".5") as? Double, 0.5)
        XCTAssertEqual(coreSchemaScalar("True") as? Bool, true)
        XCTAssertTrue(coreSchemaScalar("~") is NSNull)
        XCTAssertEqual(coreSchemaScalar("1:30:00") as? String, "1:30:00")
        XCTAssertEqual(coreSchemaScalar("0:00:0:99999999999999999999:0") as? String, "0:00:0:99999999999999999999:0")
        XCTAssertEqual(coreSchemaScalar("99999999999999999999") as? String, "99999999999999999999")
        XCTAssertEqual(coreSchemaScalar("yes") as? String, "yes")
        XCTAssertEqual((coreSchemaScalar("-.inf") as? Double).map { $0 < 0 && $0.isInfinite }, true)
    }

    func testUnknownKeysAreNamed() throws {
        XCTAssertThrowsError(try TrainRun.loadConfig(try write(#"{"stpes": 7, "model": {"widht": 3}}"#))) { e in
            XCTAssertTrue("\(e)".contains("stpes") && "\(e)".contains("model.widht"), "\(e)")
        }
    }
}

final class DataTests: XCTestCase {
    func testCSVTableSplitsAndTrains() throws {
        // 8x8 "digits"-style table: the class is which quarter of the image is lit.
        var rng = SplitMix64(seed: 1)
        var rows: [String] = []
        for i in 0..<120 {
            let label = i % 4
            let px = (0..<64).map { p -> Int in
                let (y, x) = (p / 8, p % 8)
                let quarter = (y / 4) * 2 + x / 4
                return quarter == label ? 12 + Int(rng.next() % 5) : Int(rng.next() % 3)
            }
            rows.append((px.map(String.init) + [String(label)]).joined(separator: ","))
        }
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("digits-\(UUID().uuidString).csv")
        try rows.joined(separator: "\n").write(to: url, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: url) }
        let d = try BuiltinData.load(url.path)
        XCTAssertEqual(d.train.count, 100)
        XCTAssertEqual(d.test.count, 20)
        XCTAssertEqual(d.train.height, 8)
        XCTAssertEqual(d.train.classes, 4)
        XCTAssertEqual(Int(d.train.images.max()!), 255)

        var c = TrainConfig()
        c.model.imageSize = 8; c.model.patchSize = 4; c.model.width = 16; c.model.depth = 1; c.model.heads = 2; c.model.classes = 4
        c.batchSize = 20; c.steps = 150; c.warmupSteps = 5; c.learningRate = 5e-3; c.augment = false
        let trainer = try Trainer(config: c, model: try ViT(config: c.model, backend: CPUBackend(), seed: 1), train: d.train, test: d.test)
        for _ in 0..<c.steps { _ = try trainer.trainStep() }
        XCTAssertGreaterThan(try trainer.evaluate(), 0.8)
    }

    func testCorruptIDXIsAClearError() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("idx-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
            try Data([0, 0, 8, 3, 0, 0, 0, 9]).write(to: dir.appendingPathComponent(name))
        }
        XCTAssertThrowsError(try BuiltinData.load(dir.path)) { XCTAssertTrue("\($0)".contains("corrupt data"), "\($0)") }
    }
}

final class StoredConfigTests: XCTestCase {
    /// A run folder's config.json reads back as written: an optional left nil
    /// (here: evaluate on the whole test split) stays nil, where a user's config
    /// file would get the default (2000 images). `train --resume` and the
    /// experiment's skip check depend on it.
    func testStoredConfigKeepsNilOptionals() throws {
        var c = Recipe.defaultFineTune()
        c.testExamples = nil
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stored-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try JSONEncoder().encode(c).write(to: dir.appendingPathComponent("config.json"))
        XCTAssertNil(try TrainRun.storedConfig(dir).testExamples)
        XCTAssertEqual(try TrainRun.loadConfig(dir.appendingPathComponent("config.json").path).testExamples, 2000, "a user file gets the default")
    }
}
