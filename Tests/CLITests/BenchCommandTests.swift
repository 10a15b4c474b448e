import Foundation
import XCTest

final class BenchCommandTests: XCTestCase {
    /// Runs the whole bench at the quick shapes and checks every JSON line.
    func checkQuickBench(device: String) throws {
        let r = try CLI.run(["bench", "--quick", "--json", "--device", device])
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n")
        XCTAssertGreaterThan(lines.count, 40, "too few bench rows on \(device): \(r.stdout)")
        var kernels = Set<String>()
        for line in lines {
            guard let o = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                XCTFail("not a JSON object: \(line)"); continue
            }
            let name = "\(o["kernel"] ?? "?") \(o["shape"] ?? "?")"
            kernels.insert(o["kernel"] as? String ?? "")
            let deviceName = o["device"] as? String ?? ""
            XCTAssertTrue(device == "cpu" ? deviceName == "cpu" : deviceName.hasPrefix("opencl:"), "\(deviceName): \(name)")
            let median = o["median_ms"] as? Double ?? 0
            XCTAssertGreaterThan(median, 0, name)
            XCTAssertLessThanOrEqual(o["min_ms"] as? Double ?? .infinity, median, name)
            XCTAssertGreaterThanOrEqual(o["max_ms"] as? Double ?? 0, median, name)
            let rate = (o["gflops"] as? Double) ?? (o["gbs"] as? Double)
            XCTAssertNotNil(rate, "no gflops or gbs: \(name)")
            XCTAssertGreaterThan(rate ?? 0, 0, name)
            XCTAssertNotNil(o["percent_of_ceiling"] as? Double, name)
            XCTAssertGreaterThan(o["bandwidth_ceiling_gbs"] as? Double ?? 0, 0, name)
            XCTAssertGreaterThan(o["compute_ceiling_gflops"] as? Double ?? 0, 0, name)
            if o["kernel"] as? String == "grouped-gemm-rows" { XCTAssertNotNil(o["vs_single_gemm"], name) }
            if o["kernel"] as? String == "moe-layer" {
                XCTAssertNotNil(o["outside_experts_share"], name)
                XCTAssertNotNil(o["routing_ops_share"], name)
            }
            if o["kernel"] as? String == "train-step" { XCTAssertGreaterThan(o["tokens_per_s"] as? Double ?? 0, 0, name) }
        }
        for k in ["gemm", "strided-batched", "grouped-gemm-rows", "grouped-gemm-dW", "gate-softmax-topk", "gate-topk-softmax",
                  "dispatch-plan-position", "dispatch-plan-probs", "expert-choice", "permute", "unpermute", "combine",
                  "combine-backward", "layer-norm", "layer-norm-backward", "softmax", "cross-entropy", "gelu", "gelu-backward",
                  "adamw", "global-norm", "transpose-axes", "moe-layer", "train-step"] {
            XCTAssertTrue(kernels.contains(k), "no \(k) row on \(device)")
        }
        if device == "cpu" {
            XCTAssertTrue(lines.contains { $0.contains("\"vs_openblas\"") }, "CPU gemm rows lack the OpenBLAS comparison")
        }
    }

    func testQuickBenchJSONOnTheCPUBackend() throws {
        try checkQuickBench(device: "cpu")
    }

    func testQuickBenchJSONOnOpenCL() throws {
        try CLI.requireOpenCL()
        try checkQuickBench(device: "opencl")
    }

    func testTableAlignsAndFiltersApply() throws {
        let r = try CLI.run(["bench", "--quick", "--device", "cpu", "--kernel", "gemm", "--shape", "uniform", "--runs", "2"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        guard let header = lines.first(where: { $0.contains("median ms") }) else { return XCTFail(r.stdout) }
        let rows = lines.filter { $0.hasPrefix("  grouped-gemm") }
        XCTAssertFalse(rows.isEmpty, r.stdout)
        XCTAssertFalse(lines.contains { $0.hasPrefix("  gate") }, "the --kernel filter let other kernels through")
        // Every row's median column ends where the header's does.
        let end = header.range(of: "median ms")!.upperBound.utf16Offset(in: header)
        for row in rows {
            let cells = Array(row.utf16)
            XCTAssertGreaterThan(cells.count, end, row)
            XCTAssertNotEqual(cells[end - 1], UInt16(UInt8(ascii: " ")), "median not right-aligned under its header: \(row)")
            XCTAssertEqual(cells[end], UInt16(UInt8(ascii: " ")), row)
        }
    }
}
