import Foundation
import XCTest

/// `mpirun -np 2 moe-gpu train` (Open MPI from Debian, loaded at run time)
/// against one process running the same config (gradientAccumulation is the
/// step's micro-batches over all ranks): the issue's bar is 1e-4 relative over
/// 20 steps; on the CPU backend the sums are the same operations, so the
/// curves agree bit for bit.
final class DataParallelTests: XCTestCase {
    func requireMPI() throws {
        guard FileManager.default.isExecutableFile(atPath: CLI.mpirunPath) else {
            throw XCTSkip("Open MPI is not installed: apt-get install openmpi-bin (scripts/setup.sh test does)")
        }
        guard FileManager.default.fileExists(atPath: "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") else {
            throw XCTSkip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
        }
    }

    func losses(_ out: URL) throws -> [Double] {
        try String(contentsOf: out.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n").map {
            try XCTUnwrap((try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["loss"] as? Double)
        }
    }

    /// 20 steps at a constant learning rate (so a run cut at step 10 and
    /// resumed follows the same schedule), 2 micro-batches of 16 per step.
    func config(_ dir: URL) throws -> URL {
        try CLI.smallTrainConfig(in: dir, name: "two-micro", replacing: [
            "\"steps\": 4": "\"steps\": 20", "\"evalEvery\": 2": "\"evalEvery\": 0",
            "\"gradientAccumulation\": 1": "\"gradientAccumulation\": 2", "\"minLearningRate\": 0": "\"minLearningRate\": 0.002"])
    }

    func train(ranks: Int, _ args: [String]) throws -> CLI.Result {
        let r = ranks == 1 ? try CLI.run(["train"] + args) : try CLI.mpirun(ranks: ranks, [CLI.binary.path, "train"] + args)
        XCTAssertEqual(r.status, 0, "\(ranks) ranks \(args): \(r.stderr)")
        return r
    }

    func assertSameCurve(_ a: [Double], _ b: [Double], _ label: String) {
        XCTAssertEqual(a.count, 20, label); XCTAssertEqual(b.count, 20, label)
        for (i, (x, y)) in zip(a, b).enumerated() {
            XCTAssertLessThan(abs(x - y) / abs(x), 1e-4, "\(label) step \(i + 1): \(x) vs \(y)")
        }
    }

    func compare(device: String) throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self), config = try config(dir).path
        let one = dir.appendingPathComponent("one"), two = dir.appendingPathComponent("two")
        _ = try train(ranks: 1, ["--config", config, "--device", device, "--out", one.path])
        let ranks = try train(ranks: 2, ["--config", config, "--device", device, "--out", two.path])
        XCTAssertTrue(ranks.stdout.contains("data parallel: rank 0 of 2"), ranks.stdout)
        XCTAssertEqual(ranks.stdout.components(separatedBy: "training ").count, 2, "only rank 0 prints the run: \(ranks.stdout)")
        assertSameCurve(try losses(one), try losses(two), "\(device): one process vs two ranks")
        // One allreduce of every gradient (the config's 8,986 parameters) and one of the loss terms
        // (loss, gradient norm slot, load-balancing and z-loss): 4 x (8,986 + 4) bytes a step.
        let line = try String(contentsOf: two.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n")[0]
        XCTAssertEqual((try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["allreduce_bytes"] as? Int, 4 * (8_986 + 4))
        // One run folder: config, metrics, checkpoint, eval, and the model as a Hugging Face
        // sharded set, one shard per rank, that a single process loads.
        let files = try FileManager.default.contentsOfDirectory(atPath: two.path).sorted()
        XCTAssertEqual(files, ["checkpoints", "config.json", "eval.json", "metrics.jsonl", "model-00001-of-00002.safetensors",
                               "model-00002-of-00002.safetensors", "model.safetensors.index.json"])
        let step = try FileManager.default.contentsOfDirectory(atPath: two.appendingPathComponent("checkpoints/step-00000020").path).sorted()
        XCTAssertEqual(step, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                              "optimizer-00001-of-00002.safetensors", "optimizer-00002-of-00002.safetensors", "optimizer.safetensors.index.json"])
        let evalOne = try CLI.run(["eval", "--checkpoint", one.path, "--device", device, "--limit", "100", "--json"])
        let evalTwo = try CLI.run(["eval", "--checkpoint", two.path, "--device", device, "--limit", "100", "--json"])
        XCTAssertEqual(evalTwo.status, 0, evalTwo.stderr)
        func accuracy(_ r: CLI.Result) throws -> Double {
            try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])?["accuracy"] as? Double)
        }
        XCTAssertEqual(try accuracy(evalOne), try accuracy(evalTwo), accuracy: 0.011)

        // ZeRO-1: each rank holds half the AdamW moments, updates its half of the parameters and
        // broadcasts it; the curve is the same, and every parameter crosses once a step.
        let zero = dir.appendingPathComponent("zero")
        _ = try train(ranks: 2, ["--config", config, "--device", device, "--out", zero.path, "--zero-stage", "1"])
        assertSameCurve(try losses(one), try losses(zero), "\(device): one process vs two ranks with ZeRO-1")
        let zeroLine = try String(contentsOf: zero.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n")[0]
        XCTAssertEqual((try JSONSerialization.jsonObject(with: Data(zeroLine.utf8)) as? [String: Any])?["parameter_broadcast_bytes"] as? Int, 4 * 8_986)
    }

    /// A checkpoint of 2 ranks (ZeRO-1: sharded moments, sharded files) resumes on 1,
    /// and one of 1 on 2 with ZeRO-1, on the same curve.
    func testResumeOnAnotherNumberOfRanksContinuesTheCurve() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self), config = try config(dir).path
        let reference = dir.appendingPathComponent("reference")
        _ = try train(ranks: 1, ["--config", config, "--device", "cpu", "--out", reference.path])
        // Then with the experts split over the 2 ranks (each rank holds, writes and reads only its own).
        for (first, second, ep) in [(2, 1, false), (1, 2, false), (2, 1, true), (1, 2, true)] {
            let out = dir.appendingPathComponent("from-\(first)\(ep ? "-ep" : "")")
            let split = ep ? ["--expert-parallel", "2"] : []
            _ = try train(ranks: first, ["--config", config, "--device", "cpu", "--out", out.path, "--steps", "10", "--zero-stage", "1"]
                          + (first == 2 ? split : []))
            _ = try train(ranks: second, ["--resume", out.path, "--device", "cpu", "--steps", "20"] + (second == 2 ? split : []))
            assertSameCurve(try losses(reference), try losses(out), "\(first) ranks, then \(second)\(ep ? ", experts split" : "")")
        }
    }

    func testTwoRanksEqualOneProcessAccumulatingOnTheCPU() throws { try compare(device: "cpu") }

    func testTwoRanksEqualOneProcessAccumulatingOpenCL() throws {
        try CLI.requireOpenCL()
        try compare(device: "opencl")
    }

    /// A wrapper that runs `shell` on rank 1 only, then runs its arguments.
    func rankOneWrapper(_ shell: String, in dir: URL) throws -> String {
        let script = dir.appendingPathComponent("rank.sh")
        try """
            #!/bin/bash
            if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then
              \(shell)
            fi
            exec "$@"
            """.write(to: script, atomically: true, encoding: .utf8)
        chmod(script.path, 0o755)
        return script.path
    }

    /// A wrapper that sends rank 1 `signal` `after` seconds into the run.
    func signalRankOne(_ signal: String, after seconds: Int, in dir: URL) throws -> String {
        try rankOneWrapper("( sleep \(seconds); kill -\(signal) $$ ) &", in: dir)
    }

    /// 2 micro-batches a step for as long as a test lets it run, evaluated (and checkpointed) every `evalEvery` steps.
    func longConfig(_ dir: URL, evalEvery: Int) throws -> URL {
        try CLI.smallTrainConfig(in: dir, replacing: [
            "\"steps\": 4": "\"steps\": 100000", "\"evalEvery\": 2": "\"evalEvery\": \(evalEvery)", "\"testExamples\": 100": "\"testExamples\": 20",
            "\"gradientAccumulation\": 1": "\"gradientAccumulation\": 2"])
    }

    /// A rank that dies mid-run: the other stops with a clear error within --comm-timeout.
    func testARankThatStopsAnsweringEndsTheOthersWithAClearError() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self)
        let config = try longConfig(dir, evalEvery: 0)
        // Rank 1 stops itself (SIGSTOP) after its start-up: rank 0 waits in an allreduce until the watchdog fires.
        let script = try signalRankOne("STOP", after: 3, in: dir)
        let start = Date()
        let r = try CLI.mpirun(ranks: 2, [script, CLI.binary.path, "train", "--config", config.path, "--device", "cpu",
                                          "--out", dir.appendingPathComponent("run").path, "--comm-timeout", "5"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("Error: rank 0 of 2: an allreduce has waited 5 s for the other ranks (--comm-timeout)"), r.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(start), 60, "the watchdog fires after 5 s")
    }

    /// A rank killed with SIGKILL mid-run: mpirun ends the job with an error
    /// status, and the last checkpoint rank 0 wrote still resumes.
    func testARankKilledMidRunLeavesAWholeCheckpoint() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self), out = dir.appendingPathComponent("run")
        let config = try longConfig(dir, evalEvery: 5)
        let script = try signalRankOne("KILL", after: 6, in: dir)
        let r = try CLI.mpirun(ranks: 2, [script, CLI.binary.path, "train", "--config", config.path, "--device", "cpu",
                                          "--out", out.path, "--comm-timeout", "20"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("signal 9") || r.stderr.contains("killed") || r.stderr.contains("--comm-timeout"), r.stderr)
        // The newest whole checkpoint resumes (on one process: the checkpoint holds the whole model).
        let resumed = try CLI.run(["train", "--resume", out.path, "--device", "cpu", "--steps", "\(try latestStep(out) + 1)"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
    }

    /// Ctrl-C to mpirun: Open MPI 4.1 sends the ranks SIGCONT, SIGTERM after
    /// `odls_base_sigkill_timeout` seconds and SIGKILL after as many more, and
    /// reads no output meanwhile. The ranks agree to stop after the same step,
    /// all write their shards of its checkpoint before the SIGKILL, and the run
    /// resumes from it with nothing lost.
    func testCtrlCToMpirunCheckpointsTheStepInFlight() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self), out = dir.appendingPathComponent("run")
        let config = try longConfig(dir, evalEvery: 10)
        let r = try CLI.run(["-c", """
            \(CLI.mpirunPath) --allow-run-as-root --oversubscribe --mca odls_base_sigkill_timeout 5 -np 2 \
              "$0" train --config "$1" --device cpu --out "$2" --zero-stage 1 &
            pid=$!
            until [ -d "$2/checkpoints" ]; do sleep 0.2; done
            sleep 1; kill -INT $pid; wait $pid
            """, CLI.binary.path, config.path, out.path], binary: URL(fileURLWithPath: "/bin/bash"))
        XCTAssertNotEqual(r.status, 0, "mpirun reports the interrupted job")
        let step = try latestStep(out)
        let logged = try String(contentsOf: out.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n").last
            .flatMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }?["step"] as? Int
        XCTAssertEqual(step, logged, "the step in flight when the signal came was checkpointed")
        XCTAssertGreaterThan(step, 10, "the stop came after the first evaluation's checkpoint")
        let files = try FileManager.default.contentsOfDirectory(atPath: out.appendingPathComponent(String(format: "checkpoints/step-%08d", step)).path)
        XCTAssertEqual(files.filter { $0.hasPrefix("optimizer-") }.count, 2, "both ranks' optimizer shards: \(files)")
        let resumed = try CLI.run(["train", "--resume", out.path, "--device", "cpu", "--steps", "\(step + 1)"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
    }

    /// A rank that cannot write its checkpoint shard (a file-size limit on rank 1 only):
    /// every rank stops with an error, and no partial checkpoint folder or temporary file is left.
    func testARankThatCannotWriteItsShardFailsTheCheckpointEverywhere() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self), out = dir.appendingPathComponent("run")
        // Rank 1 may write files of 24 KiB at most (its optimizer shard is larger); SIGXFSZ ignored, so writes fail with EFBIG.
        let script = try rankOneWrapper("trap '' XFSZ; ulimit -f 24", in: dir)
        let r = try CLI.mpirun(ranks: 2, [script, CLI.binary.path, "train", "--config", try config(dir).path, "--device", "cpu",
                                          "--out", out.path, "--zero-stage", "1"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("File too large"), r.stderr)
        XCTAssertTrue(r.stderr.contains("another rank could not write its shard"), r.stderr)
        let root = out.appendingPathComponent("checkpoints")
        let left = (try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []
        XCTAssertEqual(left, [], "no checkpoint, partial folder or temporary file: \(left)")
    }

    func latestStep(_ out: URL) throws -> Int {
        let names = try FileManager.default.contentsOfDirectory(atPath: out.appendingPathComponent("checkpoints").path)
        return try XCTUnwrap(names.filter { $0.hasPrefix("step-") }.compactMap { Int($0.dropFirst(5)) }.max(), "no checkpoint in \(names)")
    }

    /// Started by a launcher without a usable MPI library: one line naming the library and the way out.
    func testAMissingMPILibraryIsOneLineError() throws {
        let dir = try CLI.temporaryDirectory(self)
        let r = try CLI.run(["train", "--config", try CLI.smallTrainConfig(in: dir).path, "--device", "cpu", "--out", dir.appendingPathComponent("run").path],
                            environment: ["OMPI_COMM_WORLD_SIZE": "2", "MOE_GPU_MPI_LIBRARY": "/nonexistent/libmpi.so.40"])
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("MPI could not start: cannot load /nonexistent/libmpi.so.40") && r.stderr.contains("apt-get install openmpi-bin"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("run").path))
    }

    /// `--expert-parallel 2` on 2 ranks: each rank runs half the experts of every MoE layer for
    /// both ranks' tokens (all-to-all there and back); the curve is one process's.
    func expertParallel(device: String) throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self)
        let variants: [(String, [String: String])] = [
            ("top-k dropless", [:]),
            ("top-k with capacity drops", ["\"dropPolicy\"": "\"capacityFactor\": 0.5, \"dropPolicy\""]),
            ("expert choice", ["\"router\": \"topk\"": "\"router\": \"expert-choice\"", "\"dropPolicy\"": "\"capacityFactor\": 2, \"dropPolicy\""]),
            // 16 tokens a micro-batch top-1 over 16 experts: experts with no token, on a rank and in the group.
            ("top-1 with empty experts", ["\"experts\": 4": "\"experts\": 16", "\"topK\": 2": "\"topK\": 1", "\"batchSize\": 16": "\"batchSize\": 1"]),
        ]
        for (i, (name, change)) in variants.enumerated() {
            var text = try String(contentsOf: try config(dir), encoding: .utf8)
            for (a, b) in change { text = text.replacingOccurrences(of: a, with: b) }
            let config = dir.appendingPathComponent("ep-\(i).json")
            try text.write(to: config, atomically: true, encoding: .utf8)
            let one = dir.appendingPathComponent("one-\(i)"), two = dir.appendingPathComponent("two-\(i)")
            _ = try train(ranks: 1, ["--config", config.path, "--device", device, "--out", one.path])
            _ = try train(ranks: 2, ["--config", config.path, "--device", device, "--out", two.path, "--expert-parallel", "2"])
            assertSameCurve(try losses(one), try losses(two), "\(device) \(name): one process vs expert parallel on 2 ranks")
            // Each rank held and wrote only its own experts: the first half in rank 0's shard, the rest in rank 1's.
            let index = try JSONSerialization.jsonObject(with: Data(contentsOf: two.appendingPathComponent("model.safetensors.index.json"))) as? [String: Any]
            let map = try XCTUnwrap(index?["weight_map"] as? [String: String])
            let experts = name.contains("empty") ? 16 : 4
            for e in 0..<experts {
                XCTAssertEqual(map["blocks.1.moe.experts.\(e).fc1.weight"], e < experts / 2 ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors", "expert \(e)")
            }
            let lines = try String(contentsOf: two.appendingPathComponent("metrics.jsonl"), encoding: .utf8).split(separator: "\n")
                .compactMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            XCTAssertTrue(lines.allSatisfy { ($0["alltoall_bytes"] as? Int ?? 0) > 0 }, "\(name): every step sends rows to the other rank")
            if name.contains("empty") {
                let loads = lines.compactMap { ($0["expert_load"] as? [String: [Int]])?.values.first }
                XCTAssertTrue(loads.contains { $0.contains(0) }, "\(name): some expert got no token: \(loads)")
            }
        }
    }

    func testExpertParallelEqualsOneProcessOnTheCPU() throws { try expertParallel(device: "cpu") }

    func testExpertParallelEqualsOneProcessOpenCL() throws {
        try CLI.requireOpenCL()
        try expertParallel(device: "opencl")
    }

    func testExpertParallelNeedsTheRanksToSplitTheExperts() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self)
        let r = try CLI.mpirun(ranks: 2, [CLI.binary.path, "train", "--config", try config(dir).path, "--device", "cpu",
                                          "--out", dir.appendingPathComponent("run").path, "--expert-parallel", "2", "--experts", "3"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("3 experts do not split over 2 ranks"), r.stderr)
    }

    /// Expert parallel inside data parallel: 4 ranks in 2 groups of 2 (each group splits the
    /// experts, expert gradients are summed over the groups) equal one process with 4 micro-batches.
    func testExpertParallelGroupsInsideDataParallelEqualOneProcess() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self)
        let text = try String(contentsOf: try config(dir), encoding: .utf8)
            .replacingOccurrences(of: "\"gradientAccumulation\": 2", with: "\"gradientAccumulation\": 4")
        let config = dir.appendingPathComponent("four.json")
        try text.write(to: config, atomically: true, encoding: .utf8)
        let one = dir.appendingPathComponent("one"), four = dir.appendingPathComponent("four")
        _ = try train(ranks: 1, ["--config", config.path, "--device", "cpu", "--out", one.path])
        _ = try train(ranks: 4, ["--config", config.path, "--device", "cpu", "--out", four.path, "--expert-parallel", "2", "--zero-stage", "1"])
        assertSameCurve(try losses(one), try losses(four), "4 ranks, expert-parallel groups of 2")
        // ZeRO-1 split the experts' moments too, between the two ranks holding the same experts:
        // both groups' ranks wrote expert moments, each expert's once.
        let index = try JSONSerialization.jsonObject(with: Data(contentsOf: four.appendingPathComponent("checkpoints/step-00000020/optimizer.safetensors.index.json"))) as? [String: Any]
        let map = try XCTUnwrap(index?["weight_map"] as? [String: String])
        let expertFiles = Set(map.filter { $0.key.contains(".experts.") }.values)
        XCTAssertEqual(map.keys.filter { $0.contains(".experts.") }.count, 4 * 4 * 2, "4 experts x 4 tensors x 2 moments")
        XCTAssertTrue(expertFiles.contains("optimizer-00001-of-00004.safetensors") && expertFiles.contains("optimizer-00003-of-00004.safetensors"), "\(expertFiles)")
        let bad = try CLI.mpirun(ranks: 2, [CLI.binary.path, "train", "--config", config.path, "--device", "cpu",
                                            "--out", dir.appendingPathComponent("bad").path, "--expert-parallel", "3"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("--expert-parallel 3 does not divide the 2 ranks"), bad.stderr)
    }

    /// The two ranks in two network namespaces joined by a veth pair (scripts/mpi-netns.sh,
    /// Open MPI's TCP transport): the same curve, and the gradients really crossed the interface.
    func testTwoRanksInTwoNetworkNamespacesGiveTheSameCurve() throws {
        try requireMPI()
        guard getuid() == 0 else { throw XCTSkip("network namespaces need root") }
        let dir = try CLI.temporaryDirectory(self), config = try config(dir).path
        let one = dir.appendingPathComponent("one"), two = dir.appendingPathComponent("two")
        _ = try train(ranks: 1, ["--config", config, "--device", "cpu", "--out", one.path])
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../scripts/mpi-netns.sh").standardized
        let r = try CLI.run([CLI.binary.path, "train", "--config", config, "--device", "cpu", "--out", two.path], binary: script)
        XCTAssertEqual(r.status, 0, r.stderr)
        assertSameCurve(try losses(one), try losses(two), "two network namespaces")
        // 20 steps of one allreduce of 8,990 floats: at least the gradients' bytes arrived over the veth.
        let line = try XCTUnwrap(r.stdout.split(separator: "\n").last { $0.hasPrefix("veth bytes received: ") }, r.stdout)
        let bytes = try XCTUnwrap(Int(line.dropFirst("veth bytes received: ".count)))
        XCTAssertGreaterThan(bytes, 20 * 4 * 8_990, "bytes over the veth pair")
    }
}
