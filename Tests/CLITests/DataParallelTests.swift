import Foundation
import XCTest

/// `mpirun -np 2 moe-gpu train` (Open MPI from Debian, loaded at run time)
/// against one process accumulating the same micro-batches: the issue's bar
/// is 1e-4 relative over 20 steps; on the CPU backend the sums are the same
/// operations, so the curves agree bit for bit.
final class DataParallelTests: XCTestCase {
    static let mpirun = "/usr/bin/mpirun"

    func requireMPI() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.mpirun) else {
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

    func compare(device: String) throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self)
        let common = ["\"steps\": 4": "\"steps\": 20", "\"evalEvery\": 2": "\"evalEvery\": 0"]
        let accumulated = try CLI.smallTrainConfig(in: dir, name: "accumulated", replacing: common.merging(["\"gradientAccumulation\": 1": "\"gradientAccumulation\": 2"]) { $1 })
        let perRank = try CLI.smallTrainConfig(in: dir, name: "per-rank", replacing: common)
        let one = dir.appendingPathComponent("one"), two = dir.appendingPathComponent("two")
        let single = try CLI.run(["train", "--config", accumulated.path, "--device", device, "--out", one.path])
        XCTAssertEqual(single.status, 0, single.stderr)
        let ranks = try CLI.run(["--allow-run-as-root", "--oversubscribe", "-np", "2", CLI.binary.path,
                                 "train", "--config", perRank.path, "--device", device, "--out", two.path],
                                binary: URL(fileURLWithPath: Self.mpirun))
        XCTAssertEqual(ranks.status, 0, ranks.stderr)
        XCTAssertTrue(ranks.stdout.contains("data parallel: rank 0 of 2"), ranks.stdout)
        XCTAssertFalse(ranks.stdout.contains("rank 1 of 2") && ranks.stdout.contains("training 2"), "only rank 0 prints the run")
        let a = try losses(one), b = try losses(two)
        XCTAssertEqual(a.count, 20); XCTAssertEqual(b.count, 20)
        for (i, (x, y)) in zip(a, b).enumerated() {
            XCTAssertLessThan(abs(x - y) / abs(x), 1e-4, "\(device) step \(i + 1): one process \(x), two ranks \(y)")
        }
        // Rank 0 wrote one run folder: config, metrics, checkpoint, eval.
        let files = try FileManager.default.contentsOfDirectory(atPath: two.path).sorted()
        XCTAssertEqual(files, ["checkpoints", "config.json", "eval.json", "metrics.jsonl", "model.safetensors"])
    }

    func testTwoRanksEqualOneProcessAccumulatingOnTheCPU() throws { try compare(device: "cpu") }

    func testTwoRanksEqualOneProcessAccumulatingOpenCL() throws {
        try CLI.requireOpenCL()
        try compare(device: "opencl")
    }

    /// A rank that dies mid-run: the other stops with a clear error within --comm-timeout.
    func testARankThatStopsAnsweringEndsTheOthersWithAClearError() throws {
        try requireMPI()
        let dir = try CLI.temporaryDirectory(self)
        let config = try CLI.smallTrainConfig(in: dir, replacing: ["\"steps\": 4": "\"steps\": 100000", "\"evalEvery\": 2": "\"evalEvery\": 0"])
        // Rank 1 stops itself (SIGSTOP) after its start-up: rank 0 waits in an allreduce until the watchdog fires.
        let script = dir.appendingPathComponent("rank.sh")
        try """
            #!/bin/bash
            if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then ( sleep 3; kill -STOP $$ ) & fi
            exec "$@"
            """.write(to: script, atomically: true, encoding: .utf8)
        chmod(script.path, 0o755)
        let start = Date()
        let r = try CLI.run(["--allow-run-as-root", "--oversubscribe", "-np", "2", script.path, CLI.binary.path,
                             "train", "--config", config.path, "--device", "cpu", "--out", dir.appendingPathComponent("run").path,
                             "--comm-timeout", "5"], binary: URL(fileURLWithPath: Self.mpirun))
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("Error: rank 0 of 2: an allreduce has waited 5 s for the other ranks (--comm-timeout)"), r.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(start), 60, "the watchdog fires after 5 s")
    }
}
