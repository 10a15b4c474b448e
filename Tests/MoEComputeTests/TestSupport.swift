import Foundation
import MoECompute
import XCTest

/// The OpenCL backend on the first OpenCL device (PoCL in CI), shared across
/// tests so each kernel file is compiled once per run.
enum TestDevices {
    static let openCL: Result<OpenCLBackend, Error> = {
        let catalog = DeviceCatalog()
        guard let device = catalog.openCLDevices.first else {
            return .failure(DeviceNotFound(description: "no OpenCL platform on this machine (install pocl-opencl-icd)"))
        }
        return Result { try OpenCLBackend(device: device) }
    }()

    static let cpu = CPUBackend()

    /// The OpenCL backend, or an XCTSkip naming why there is none: never a silent pass.
    static func openCLOrSkip() throws -> OpenCLBackend {
        switch openCL {
        case .success(let b): return b
        case .failure(let e): throw XCTSkip("OpenCL tests skipped: \(e)")
        }
    }

    /// Tunings that force each GEMM kernel (the tiled GPU one and the CPU-device
    /// one) with odd tile sizes, so both are tested on whatever device is present.
    static func gemmVariants() throws -> [(String, KernelTuning)] {
        let device = try openCLOrSkip().device
        var tiled = KernelTuning(for: device)
        tiled.cpuGemm = false
        tiled.gemm = .init(tileM: 32, tileN: 64, tileK: 8, wptM: 4, wptN: 8)
        var cpu = KernelTuning(for: device)
        cpu.cpuGemm = true
        cpu.cpuRows = 3; cpu.cpuVecs = 1
        return [("tiled 32x64x8", tiled), ("cpu 3x16", cpu)]
    }

    /// Both backends; the OpenCL one is skipped with its reason when absent.
    static func all() throws -> [Backend] { [cpu, try openCLOrSkip()] }
}

/// Deterministic random inputs.
func randomFloats(_ n: Int, seed: UInt64, in range: ClosedRange<Float> = -1...1) -> [Float] {
    var rng = SplitMix64(seed: seed)
    return (0..<n).map { _ in rng.nextFloat(in: range) }
}

func assertRelativeError(_ got: [Float], _ ref: [Double], below bound: Double, _ what: @autoclosure () -> String,
                         file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(got.count, ref.count, "\(what()): length", file: file, line: line)
    guard got.count == ref.count else { return }
    let err = Reference.relativeError(got.map(Double.init), ref)
    XCTAssertLessThan(err, bound, "\(what()): relative error \(err)", file: file, line: line)
}
