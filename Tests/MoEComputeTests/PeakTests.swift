import Foundation
@testable import MoECompute
import XCTest
import MoETestSupport

/// The FMA peak probes: they run, report a rate and what ran, and pick the
/// widest vector width the CPU has. No timing assertions (shared machines).
final class PeakTests: XCTestCase {
    /// The CPU's feature flags from /proc/cpuinfo (Linux), independent of the probe's own detection.
    static var cpuFlags: Set<String>? {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
              let colon = line.firstIndex(of: ":") else { return nil }
        return Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
    }

    func testCPUProbeReportsAPositiveRateAndAKnownISA() {
        let peak = FMAPeak.cpu(seconds: 0.02, repeats: 1)
        XCTAssertGreaterThan(peak.gflops, 0)
        XCTAssertTrue(peak.gflops.isFinite)
        XCTAssertTrue(["avx512f", "avx2+fma", "portable"].contains(peak.isa), peak.isa)
        XCTAssertEqual(peak.isa, CPUPeakISA.best.name)
        XCTAssertEqual(peak.parallelism, ProcessInfo.processInfo.activeProcessorCount)
    }

    func testTheWidestVectorWidthIsPicked() throws {
        XCTAssertTrue(CPUPeakISA.best.isSupported)
        #if arch(x86_64)
        guard let flags = PeakTests.cpuFlags else { throw XCTSkip("no /proc/cpuinfo here") }
        if flags.contains("avx512f") {
            XCTAssertEqual(CPUPeakISA.best, .avx512, "AVX-512F is in /proc/cpuinfo but the probe picked \(CPUPeakISA.best.name)")
            XCTAssertEqual(CPUPeakISA.best.lanes, 16)
        } else if flags.contains("avx2") && flags.contains("fma") {
            XCTAssertEqual(CPUPeakISA.best, .avx2)
        }
        #else
        XCTAssertEqual(CPUPeakISA.best, .portable)
        #endif
    }

    func testEverySupportedProbeRunsOnOneThread() {
        XCTAssertTrue(CPUPeakISA.portable.isSupported)
        for isa in CPUPeakISA.allCases where isa.isSupported {
            let peak = FMAPeak.cpu(isa: isa, threads: 1, seconds: 0.01, repeats: 1)
            XCTAssertGreaterThan(peak.gflops, 0, isa.name)
            XCTAssertEqual(peak.isa, isa.name)
            XCTAssertEqual(peak.parallelism, 1)
        }
    }

    func testOpenCLProbeReportsAPositiveRate() throws {
        let backend = try TestDevices.openCLOrSkip()
        let peak = try FMAPeak.openCL(backend, seconds: 0.02, repeats: 1)
        XCTAssertGreaterThan(peak.gflops, 0)
        XCTAssertTrue(peak.gflops.isFinite)
        XCTAssertTrue(peak.isa.hasPrefix("opencl"), peak.isa)
    }

    func testPercentOfPeakOnlyForComputeRows() {
        let gemm = BenchResult(kernel: "gemm", shape: "s", medianSeconds: 1, minSeconds: 1, maxSeconds: 1, runs: 1,
                               flops: 50e9, bytes: 0, bandwidthCeiling: 10, computeCeiling: 80, fmaPeak: 100, extra: [:])
        XCTAssertEqual(gemm.percentOfPeak ?? 0, 50, accuracy: 1e-9)
        XCTAssertEqual(gemm.json(device: "cpu", description: "")["percent_of_peak"] as? Double ?? 0, 50, accuracy: 1e-9)
        let copy = BenchResult(kernel: "permute", shape: "s", medianSeconds: 1, minSeconds: 1, maxSeconds: 1, runs: 1,
                               flops: 0, bytes: 5e9, bandwidthCeiling: 10, computeCeiling: 80, fmaPeak: 100, extra: [:])
        XCTAssertNil(copy.percentOfPeak)
        XCTAssertNil(copy.json(device: "cpu", description: "")["percent_of_peak"])
    }
}
