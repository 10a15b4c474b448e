import Foundation
import XCTest

final class TrainCommandTests: XCTestCase {
    var hasFashionMNIST: Bool { FileManager.default.fileExists(atPath: "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") }

    func smallConfig(_ dir: URL, lr: Double = 0.002) throws -> URL { try CLI.smallTrainConfig(in: dir, lr: lr) }

    /// `smallConfig` with some of its text replaced (longer runs, other sizes), written as NAME.json.
    func variant(_ dir: URL, _ name: String, _ replacements: [String: String]) throws -> URL {
        try CLI.smallTrainConfig(in: dir, name: name, replacing: replacements)
    }

    func testTrainWithAConfigFileWritesEveryOutputAndEvalReadsIt() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("run")
        let r = try CLI.run(["train", "--config", try smallConfig(dir).path, "--device", "cpu", "--out", out.path])
        XCTAssertEqual(r.status, 0, r.stderr)
        for f in ["config.json", "metrics.jsonl", "model.safetensors", "checkpoints/step-00000004/model.safetensors",
                  "checkpoints/step-00000004/optimizer.safetensors", "eval.json"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: out.appendingPathComponent(f).path), "\(f) missing")
        }
        // The last two checkpoints are kept; model.safetensors is the latest model.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: out.appendingPathComponent("checkpoints").path).sorted(),
                       ["step-00000002", "step-00000004"])
        XCTAssertEqual(try Data(contentsOf: out.appendingPathComponent("model.safetensors")),
                       try Data(contentsOf: out.appendingPathComponent("checkpoints/step-00000004/model.safetensors")))
        let metrics = try String(contentsOf: out.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(metrics.count, 4)
        let last = try JSONSerialization.jsonObject(with: Data(metrics.last!.utf8)) as! [String: Any]
        for key in ["step", "loss", "aux_loss", "z_loss", "lr", "accuracy", "tokens_per_s", "expert_load"] {
            XCTAssertNotNil(last[key], "metrics line lacks \(key): \(last)")
        }
        let e = try CLI.run(["eval", "--checkpoint", out.appendingPathComponent("model.safetensors").path, "--limit", "100", "--json"])
        XCTAssertEqual(e.status, 0, e.stderr)
        let evalObject = try JSONSerialization.jsonObject(with: Data(e.stdout.utf8)) as! [String: Any]
        let written = try JSONSerialization.jsonObject(with: Data(contentsOf: out.appendingPathComponent("eval.json"))) as! [String: Any]
        XCTAssertEqual(evalObject["accuracy"] as! Double, written["accuracy"] as! Double, accuracy: 1e-12)
    }

    /// Issue 11, defect 2: a second run never appends to the first's metrics. An explicit
    /// --out that holds a run is an error (unless --overwrite); without --out a new
    /// runs/NAME-N folder is used; --resume drops the metrics logged after its checkpoint.
    func testRunsNeverAppendToAnotherRunsMetrics() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("run"), config = try smallConfig(dir).path
        func steps(_ folder: URL) throws -> [Int] {
            try String(contentsOf: folder.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n").map {
                try XCTUnwrap((JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["step"] as? Int)
            }
        }
        XCTAssertEqual(try CLI.run(["train", "--config", config, "--device", "cpu", "--out", out.path]).status, 0)
        let again = try CLI.run(["train", "--config", config, "--device", "cpu", "--out", out.path])
        XCTAssertNotEqual(again.status, 0)
        XCTAssertTrue(again.stderr.contains("already holds a run") && again.stderr.contains("--overwrite"), again.stderr)
        XCTAssertEqual(try steps(out), [1, 2, 3, 4], "the refused run left the first one alone")
        let overwritten = try CLI.run(["train", "--config", config, "--device", "cpu", "--out", out.path, "--overwrite"])
        XCTAssertEqual(overwritten.status, 0, overwritten.stderr)
        XCTAssertEqual(try steps(out), [1, 2, 3, 4])

        // Metrics logged past the last checkpoint (step 4) are dropped on resume, then logged again.
        let metrics = out.appendingPathComponent("metrics.jsonl")
        let handle = try FileHandle(forWritingTo: metrics)
        try handle.seekToEnd(); handle.write(Data("{\"step\": 5, \"loss\": 99}\n".utf8)); try handle.close()
        let resumed = try CLI.run(["train", "--resume", out.path, "--steps", "6", "--device", "cpu"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertEqual(try steps(out), [1, 2, 3, 4, 5, 6])
        XCTAssertFalse(try String(contentsOf: metrics, encoding: .utf8).contains("\"loss\": 99"))

        // Without --out: runs/topk, then runs/topk-2 (said in the output).
        for expected in ["runs/topk", "runs/topk-2"] {
            let r = try CLI.run(["train", "--config", config, "--device", "cpu"], directory: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertTrue(r.stdout.contains("/\(expected)\n"), r.stdout)
            XCTAssertEqual(try steps(dir.appendingPathComponent(expected)), [1, 2, 3, 4])
        }
    }

    /// Issue 11, defect 1: a model and an optimizer of different steps are not one
    /// checkpoint (an older moe-gpu killed between its two writes left such pairs): refused.
    func testResumeRefusesAModelAndAnOptimizerOfDifferentSteps() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("run")
        XCTAssertEqual(try CLI.run(["train", "--config", try smallConfig(dir).path, "--device", "cpu", "--out", out.path]).status, 0)
        // The layout before checkpoints were one unit: model (step 4) and optimizer (step 2) beside each other.
        let fm = FileManager.default
        try fm.removeItem(at: out.appendingPathComponent("model.safetensors"))
        try fm.copyItem(at: out.appendingPathComponent("checkpoints/step-00000004/model.safetensors"), to: out.appendingPathComponent("model.safetensors"))
        try fm.copyItem(at: out.appendingPathComponent("checkpoints/step-00000002/optimizer.safetensors"), to: out.appendingPathComponent("optimizer.safetensors"))
        try fm.removeItem(at: out.appendingPathComponent("checkpoints"))
        let r = try CLI.run(["train", "--resume", out.path, "--steps", "6", "--device", "cpu"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("the model is from step 4 but the optimizer from step 2"), r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
    }

    /// SIGKILL at random moments, checkpoint writes included (10 times here,
    /// MOE_GPU_KILLS=50 by hand): the latest checkpoint
    /// always loads with matching steps, and --resume continues to the end.
    func testKilledAtRandomMomentsResumeAlwaysContinues() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("run")
        let config = try variant(dir, "long", ["\"steps\": 4": "\"steps\": 100000", "\"evalEvery\": 2": "\"evalEvery\": 1", "\"testExamples\": 100": "\"testExamples\": 16"])
        var rng = SystemRandomNumberGenerator()
        var kills = 0, lastStep = 0
        // 10 in CI; MOE_GPU_KILLS=50 for the longer run by hand.
        let rounds = Int(ProcessInfo.processInfo.environment["MOE_GPU_KILLS"] ?? "") ?? 10
        var checked = 0
        for i in 0..<rounds {
            let p = Process()
            p.executableURL = CLI.binary
            // Killed before its first checkpoint (a slow start on a busy machine): start over.
            let root = out.appendingPathComponent("checkpoints")
            let started = ((try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []).contains { $0.hasPrefix("step-") }
            p.arguments = started ? ["train", "--resume", out.path, "--device", "cpu"]
                                  : ["train", "--config", config.path, "--device", "cpu", "--out", out.path, "--overwrite"]
            p.standardOutput = FileHandle.nullDevice
            let err = Pipe()
            p.standardError = err
            try p.run()
            Thread.sleep(forTimeInterval: Double.random(in: 0.4...1.6, using: &rng))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            if p.terminationReason == .uncaughtSignal { kills += 1 }
            let message = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            XCTAssertFalse(message.contains("Error"), "run \(i): \(message)")
            // Whatever the moment, the newest checkpoint is whole: both files, the same step.
            let steps = ((try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []).filter { $0.hasPrefix("step-") }.sorted()
            // Two kept, plus one when the kill fell between the new one's rename and the pruning.
            XCTAssertLessThanOrEqual(steps.count, 3)
            guard let newest = steps.last else { lastStep = 0; continue }
            checked += 1
            let step = try XCTUnwrap(Int(newest.dropFirst(5)))
            for f in ["model.safetensors", "optimizer.safetensors"] {
                let data = try Data(contentsOf: root.appendingPathComponent(newest).appendingPathComponent(f))
                let n = Int(data.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
                let header = try XCTUnwrap(JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + n))) as? [String: Any])
                XCTAssertEqual((header["__metadata__"] as? [String: String])?["step"], "\(step)", "\(newest)/\(f)")
            }
            XCTAssertGreaterThanOrEqual(step, lastStep, "resume went backwards")
            lastStep = step
        }
        XCTAssertGreaterThan(kills, rounds / 2, "the runs were killed, not finished")
        XCTAssertGreaterThan(checked, rounds / 2, "most runs got as far as a checkpoint")
        // And a resume to a near step finishes normally.
        let done = try CLI.run(lastStep > 0 ? ["train", "--resume", out.path, "--steps", "\(lastStep + 2)", "--device", "cpu"]
                                            : ["train", "--config", config.path, "--device", "cpu", "--out", out.path, "--overwrite", "--steps", "3"])
        XCTAssertEqual(done.status, 0, done.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: out.appendingPathComponent("eval.json").path))
    }

    /// SIGINT and SIGTERM: the step finishes, a checkpoint of it is written, the
    /// way to resume is printed, the exit status is 130 / 143; resume continues.
    func testInterruptAndTerminateCheckpointAndSayHowToResume() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("run")
        let config = try variant(dir, "long", ["\"steps\": 4": "\"steps\": 100000", "\"evalEvery\": 2": "\"evalEvery\": 1000"])
        for (i, (signal, status)) in [(SIGINT, Int32(130)), (SIGTERM, Int32(143))].enumerated() {
            let p = Process()
            p.executableURL = CLI.binary
            p.arguments = i == 0 ? ["train", "--config", config.path, "--device", "cpu", "--out", out.path] : ["train", "--resume", out.path, "--device", "cpu"]
            let stdout = Pipe()
            p.standardOutput = stdout
            p.standardError = FileHandle.nullDevice
            try p.run()
            // Until it has logged a few more steps (no checkpoint before step 1000).
            let metrics = out.appendingPathComponent("metrics.jsonl")
            func lines() -> Int { (try? String(contentsOf: metrics, encoding: .utf8))?.split(separator: "\n").count ?? 0 }
            let before = i == 0 ? 0 : lines(), deadline = Date().addingTimeInterval(30)
            while Date() < deadline, lines() < before + 5 {
                Thread.sleep(forTimeInterval: 0.05)
            }
            kill(p.processIdentifier, signal)
            let said = String(decoding: stdout.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            XCTAssertEqual(p.terminationStatus, status, said)
            XCTAssertTrue(said.contains("resume with: moe-gpu train --resume \(out.path)"), said)
            let root = out.appendingPathComponent("checkpoints")
            let newest = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: root.path).filter { $0.hasPrefix("step-") }.sorted().last)
            let step = try XCTUnwrap(Int(newest.dropFirst(5)))
            XCTAssertTrue(said.contains("after step \(step);"), said)
            let lines = try String(contentsOf: metrics, encoding: .utf8).split(separator: "\n")
            let logged = try XCTUnwrap((JSONSerialization.jsonObject(with: Data(lines.last!.utf8)) as? [String: Any])?["step"] as? Int)
            XCTAssertEqual(logged, step, "the checkpoint is the last logged step")
        }
    }

    /// Disk full (a file-size limit, SIGXFSZ ignored, so writes fail with EFBIG):
    /// a checkpoint and an upcycled model fail with one line, the previous files
    /// stay intact and no temporary file is left.
    func testFullDiskLeavesThePreviousFilesIntact() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("run")
        let config = try variant(dir, "wide", ["\"width\": 16": "\"width\": 64", "\"moeBlocks\": [1]": "\"moeBlocks\": []"])
        XCTAssertEqual(try CLI.run(["train", "--config", config.path, "--device", "cpu", "--out", out.path]).status, 0)
        let model = out.appendingPathComponent("model.safetensors"), before = try Data(contentsOf: model)
        func limited(_ args: [String]) throws -> CLI.Result {
            try CLI.run(["-c", "ulimit -f 200; trap '' XFSZ; exec \"$0\" \"$@\"", CLI.binary.path] + args, binary: URL(fileURLWithPath: "/bin/bash"))
        }
        let r = try limited(["train", "--resume", out.path, "--steps", "6", "--device", "cpu"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("File too large") && r.stderr.contains("the previous file is untouched"), r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertEqual(try Data(contentsOf: model), before)
        let hidden = try FileManager.default.subpathsOfDirectory(atPath: out.path).filter { $0.split(separator: "/").contains { $0.hasPrefix(".") } }
        XCTAssertEqual(hidden, [], "temporary files left behind")
        // The last good checkpoint still resumes.
        XCTAssertEqual(try CLI.run(["train", "--resume", out.path, "--steps", "6", "--device", "cpu"]).status, 0)

        // An upcycled model onto an existing file: the old file stays.
        let target = dir.appendingPathComponent("moe.safetensors")
        try Data("previous".utf8).write(to: target)
        let u = try limited(["upcycle", "--from", model.path, "--to", target.path, "--experts", "8"])
        XCTAssertNotEqual(u.status, 0)
        XCTAssertTrue(u.stderr.contains("File too large"), u.stderr)
        XCTAssertEqual(try String(contentsOf: target, encoding: .utf8), "previous")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasPrefix(".") }, [])
    }

    /// Bad option values: one `Error:` line each that names the value and the way out, no usage text.
    func testBadOptionValuesAreOneLineErrors() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let config = try smallConfig(dir).path
        let cases: [([String], String)] = [
            (["--batch-size", "0"], "batchSize"),
            (["--router", "topk", "--top-k", "9"], "topK 9 must be in 1...8"),
            (["--router", "topk", "--experts", "0"], "experts must be at least 1"),
            (["--router", "hash"], "unknown router \"hash\""),
            (["--device", "foo"], "unknown device 'foo'"),
            (["--upcycle", "magic"], "unknown --upcycle 'magic'"),
            (["--config", config, "--out", "/proc/moe-gpu-run"], "cannot create the output folder /proc/moe-gpu-run"),
            (["--steps", "-3"], "--steps -3: must not be negative"),
            (["--config", config, "--steps=0"], "steps 0 must be at least 1"),
            (["--config", config, "--width=0"], "width 0 and heads 2 must be at least 1"),
            (["--config", config, "--skip-nonfinite=-1"], "skipNonFinite -1 must not be negative"),
            (["--upcycle", "granular", "--granularity", "0"], "--granularity 0 must be at least 1"),
            (["--experts", "many"], "The value 'many' is invalid for '--experts <experts>'"),
            (["--bogus"], "Unknown option '--bogus'"),
            (["--config", try variant(dir, "cf", ["\"dropPolicy\"": "\"capacityFactor\": -1, \"dropPolicy\""]).path], "capacityFactor must be positive"),
        ]
        for (args, expected) in cases {
            let r = try CLI.run(["train"] + args, directory: dir)
            XCTAssertNotEqual(r.status, 0, "\(args)")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("Error: ") && r.stderr.contains(expected), "\(args): \(r.stderr)")
        }
    }

    /// A model too big for the device: one line with the tensor's size, the
    /// device's limit and the way out, and no output folder. PoCL's
    /// POCL_MEMORY_LIMIT=1 (GiB) makes its largest allocation 256 MiB.
    func testOpenCLTensorOverTheDeviceLimitIsOneLineError() throws {
        try CLI.requireOpenCL()
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        guard try CLI.run(["devices"]).stdout.contains("Portable Computing Language") else { throw XCTSkip("the device limit is set through PoCL") }
        let dir = try CLI.temporaryDirectory(self), out = dir.appendingPathComponent("run")
        let config = try variant(dir, "huge", ["\"width\": 16": "\"width\": 8192"])
        let r = try CLI.run(["train", "--config", config.path, "--device", "opencl", "--out", out.path], environment: ["POCL_MEMORY_LIMIT": "1"])
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.hasPrefix("Error: a tensor of 768.0 MiB is over ") && r.stderr.contains("largest allocation (256.0 MiB)")
                      && r.stderr.contains("--device cpu"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path), "an output folder was left")
    }

    /// Other commands' bad values, and a checkpoint whose tensors do not fit the config it carries.
    func testBadUpcycleMethodAndMismatchedCheckpointAreOneLineErrors() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self), out = dir.appendingPathComponent("run")
        let method = try CLI.run(["upcycle", "--from", "x.safetensors", "--to", "y.safetensors", "--method", "magic"], directory: dir)
        XCTAssertEqual(method.status, 64)
        XCTAssertEqual(method.stderr.split(separator: "\n").count, 1, method.stderr)
        XCTAssertTrue(method.stderr.contains("'magic' is invalid for '--method <method>'"), method.stderr)

        XCTAssertEqual(try CLI.run(["train", "--config", try smallConfig(dir).path, "--device", "cpu", "--out", out.path]).status, 0)
        // The same length, so the header stays valid: the config now says mlpRatio 3.
        var bytes = try Data(contentsOf: out.appendingPathComponent("model.safetensors"))
        let from = Data("mlpRatio\\\" : 2".utf8), to = Data("mlpRatio\\\" : 3".utf8)
        let range = try XCTUnwrap(bytes.range(of: from), "the stored config's mlpRatio")
        bytes.replaceSubrange(range, with: to)
        let edited = dir.appendingPathComponent("edited.safetensors")
        try bytes.write(to: edited)
        let r = try CLI.run(["eval", "--checkpoint", edited.path, "--device", "cpu"])
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("edited.safetensors: ") && r.stderr.contains("has shape [32, 16], the model needs [48, 16]"), r.stderr)
    }

    func testMissingDataNamesTheFolder() throws {
        let dir = try CLI.temporaryDirectory(self)
        let r = try CLI.run(["train", "--config", try smallConfig(dir).path, "--data", dir.appendingPathComponent("nowhere").path,
                             "--out", dir.appendingPathComponent("out").path])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("nowhere/train-images-idx3-ubyte"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("out/model.safetensors").path))
    }

    func testBadConfigIsOneClearLine() throws {
        let dir = try CLI.temporaryDirectory(self)
        let url = dir.appendingPathComponent("bad.json")
        try "{\"steps\": \"many\"}".write(to: url, atomically: true, encoding: .utf8)
        let r = try CLI.run(["train", "--config", url.path])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("bad.json"), r.stderr)
    }

    func testDivergingLossStopsWithAClearErrorAndKeepsNoHalfFile() throws {
        guard hasFashionMNIST else { throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist") }
        let dir = try CLI.temporaryDirectory(self)
        let out = dir.appendingPathComponent("run")
        let r = try CLI.run(["train", "--config", try smallConfig(dir, lr: 1e30).path, "--device", "cpu", "--out", out.path])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("NaN or infinite at step"), r.stderr)
        // The step and the first parameter whose gradient went bad (in model order).
        XCTAssertTrue(r.stderr.contains("(first non-finite gradient: "), r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        let leftovers = (try? FileManager.default.contentsOfDirectory(atPath: out.path)) ?? []
        XCTAssertFalse(leftovers.contains { $0.contains(".tmp") }, "temporary files left: \(leftovers)")

        // --skip-nonfinite N: up to N such steps are skipped and counted, the run goes on.
        let skipOut = dir.appendingPathComponent("skip")
        let skipped = try CLI.run(["train", "--config", try smallConfig(dir, lr: 1e30).path, "--device", "cpu", "--out", skipOut.path,
                                   "--skip-nonfinite", "100"])
        XCTAssertEqual(skipped.status, 0, skipped.stderr)
        let lines = try String(contentsOf: skipOut.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n")
        let counts = try lines.map { try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])["nonfinite_skipped"] as? Int ?? 0 }
        XCTAssertEqual(counts.count, 4, "every step logged")
        XCTAssertGreaterThan(counts.last!, 0, "\(lines)")
        XCTAssertEqual(counts, counts.sorted(), "a running count")
        // The count is part of the checkpoint: a resumed run goes on counting, so N bounds the whole run.
        let resumed = try CLI.run(["train", "--resume", skipOut.path, "--steps", "6", "--device", "cpu", "--skip-nonfinite", "100"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        let after = try String(contentsOf: skipOut.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n")
            .map { try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])["nonfinite_skipped"] as? Int ?? 0 }
        XCTAssertEqual(Array(after.prefix(4)), counts)
        XCTAssertEqual(after.count, 6)
        XCTAssertEqual(after[4], counts.last! + 1, "the count after the resume: \(after)")
        let limited = try CLI.run(["train", "--config", try smallConfig(dir, lr: 1e30).path, "--device", "cpu", "--out", dir.appendingPathComponent("few").path,
                                   "--skip-nonfinite", "\(max(counts.last! - 1, 0))"])
        XCTAssertNotEqual(limited.status, 0, "more bad steps than allowed")
    }
}
