import Foundation
import MoECompute
import XCTest

// Which backends the tests use, and the two passes of `make test`.
//
// MOE_GPU_TEST_BACKENDS (read here, for every test target):
//   all     (default) CPU always, OpenCL when a platform is present: without one, op
//           tests run their CPU half (a note says so once) and OpenCL cases skip.
//   cpu     CPU only. `TestDevices.all()` is [cpu]; an OpenCL case that runs anyway
//           fails, naming the rule below (it should have been left out by name).
//   opencl  `all()` is [cpu, opencl]: the CPU half stays, as the reference the
//           cross-backend comparisons need. Without a platform, tests skip.
//
// Every test is one of three kinds:
//   1. OpenCL cases need OpenCL for (part of) what they check. Their names start with
//      `testOpenCL` or end with `OpenCL`; they get the device from
//      `TestDevices.openCLOrSkip()` (CLITests: `CLI.requireOpenCL()`). They run in pass 2 only.
//   2. Op tests in MoEComputeTests loop over `TestDevices.all()` (or a `backends()`
//      built on `TestDevices.openCLHalf()`): the CPU half in pass 1, both halves in
//      pass 2. A comparison between backends runs when there are two.
//   3. Everything else (pure-host, CPU-only, `testCPU...`, GPUCompileTests): pass 1
//      only. Their names must not match kind 1's pattern.
//
// The passes (Makefile `test`, after one `swift build --build-tests`):
//   1. OCL_ICD_VENDORS=<empty dir> MOE_GPU_TEST_BACKENDS=cpu
//        swift test --skip '/testOpenCL|OpenCL$'
//      every test but the OpenCL cases, with no OpenCL platform visible: any skip
//      fails `make test` (the Makefile checks the log).
//   2. MOE_GPU_TEST_BACKENDS=opencl
//        swift test --filter '^MoEComputeTests\.|/testOpenCL|OpenCL$' --skip '\.GPUCompileTests/|/testCPU'
//      the OpenCL cases of every target plus MoEComputeTests' op tests, on PoCL.
//      (MoEComputeTests' few pure-host checks run here again; they take milliseconds.)

/// MOE_GPU_TEST_BACKENDS: see the top of this file.
public enum TestBackendSelection: String {
    case all, cpu, opencl

    public static let current: TestBackendSelection = {
        let raw = ProcessInfo.processInfo.environment["MOE_GPU_TEST_BACKENDS"] ?? ""
        if raw.isEmpty { return .all }
        guard let s = TestBackendSelection(rawValue: raw.lowercased()) else {
            fatalError("MOE_GPU_TEST_BACKENDS=\(raw): expected all, cpu or opencl")
        }
        return s
    }()
}

/// An OpenCL case ran in the CPU pass: a failure, never a skip.
public struct OpenCLCaseInCPUPass: Error, CustomStringConvertible {
    public init() {}
    public var description: String {
        "an OpenCL case ran with MOE_GPU_TEST_BACKENDS=cpu: name it testOpenCL... or ...OpenCL so the CPU pass "
            + "leaves it out (rule at the top of Tests/MoETestSupport/TestSupport.swift)"
    }
}

/// The backends under test: the CPU one, and the OpenCL backend on the first
/// OpenCL device (PoCL in CI), shared across tests so each kernel file is
/// compiled once per run.
public enum TestDevices {
    public static let openCL: Result<OpenCLBackend, Error> = {
        let catalog = DeviceCatalog()
        guard let device = catalog.openCLDevices.first else {
            return .failure(DeviceNotFound(description: "no OpenCL platform on this machine (install pocl-opencl-icd)"))
        }
        return Result { try OpenCLBackend(device: device) }
    }()

    public static let cpu = CPUBackend()

    /// For OpenCL cases: the OpenCL backend, or an XCTSkip naming why there is
    /// none (never a silent pass); in the CPU pass, a failure.
    public static func openCLOrSkip() throws -> OpenCLBackend {
        if TestBackendSelection.current == .cpu { throw OpenCLCaseInCPUPass() }
        switch openCL {
        case .success(let b): return b
        case .failure(let e): throw XCTSkip("OpenCL tests skipped: \(e)")
        }
    }

    /// Tunings that force each GEMM kernel (the tiled GPU one and the CPU-device
    /// one) with odd tile sizes, so both are tested on whatever device is present.
    public static func gemmVariants() throws -> [(String, KernelTuning)] {
        let device = try openCLOrSkip().device
        var tiled = KernelTuning(for: device)
        tiled.cpuGemm = false
        tiled.gemm = .init(tileM: 32, tileN: 64, tileK: 8, wptM: 4, wptN: 8)
        var cpu = KernelTuning(for: device)
        cpu.cpuGemm = true
        cpu.cpuRows = 3; cpu.cpuVecs = 1
        return [("tiled 32x64x8", tiled), ("cpu 3x16", cpu)]
    }

    /// The OpenCL half of an op test: nil in the CPU pass, and (with a note, once)
    /// when no platform is present by default; an XCTSkip in the OpenCL pass.
    public static func openCLHalf() throws -> OpenCLBackend? {
        switch TestBackendSelection.current {
        case .cpu: return nil
        case .opencl: return try openCLOrSkip()
        case .all:
            if case .success(let b) = openCL { return b }
            _ = missingOpenCLNote
            return nil
        }
    }

    private static let missingOpenCLNote: Void = {
        if case .failure(let e) = openCL {
            FileHandle.standardError.write(Data("note: OpenCL halves of the op tests not run (\(e)); their CPU halves run\n".utf8))
        }
    }()

    /// The backends an op test loops over: the CPU one always, then the OpenCL
    /// one when selected and present. Never throws for a missing platform except
    /// in the OpenCL pass.
    public static func all() throws -> [Backend] { [cpu] + (try openCLHalf().map { [$0] } ?? []) }
}

/// Deterministic random inputs.
public func randomFloats(_ n: Int, seed: UInt64, in range: ClosedRange<Float> = -1...1) -> [Float] {
    var rng = SplitMix64(seed: seed)
    return (0..<n).map { _ in rng.nextFloat(in: range) }
}

public func assertRelativeError(_ got: [Float], _ ref: [Double], below bound: Double, _ what: @autoclosure () -> String,
                         file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(got.count, ref.count, "\(what()): length", file: file, line: line)
    guard got.count == ref.count else { return }
    let err = Reference.relativeError(got.map(Double.init), ref)
    XCTAssertLessThan(err, bound, "\(what()): relative error \(err)", file: file, line: line)
}

/// Files the tests fetch once into a cache (real checkpoints, the text corpus):
/// `scripts/SCRIPT` (run from the repository root with the cache folder as its
/// argument) fills `cacheVariable`'s folder, default `~/.cache/moe-gpu/DEFAULT`.
/// Returns the folder once `present` holds, fetching if needed; an XCTSkip with
/// the script's one-line error when that is impossible (the CPU pass of
/// `make test` fails on any skip, so CI never passes without them).
public func fetchedCache(script: String, cacheVariable: String, defaultFolder: String, what: String,
                         present: (URL) -> Bool) throws -> URL {
    let env = ProcessInfo.processInfo.environment
    let base = env[cacheVariable].map { URL(fileURLWithPath: $0) }
        ?? URL(fileURLWithPath: env["XDG_CACHE_HOME"] ?? (NSHomeDirectory() + "/.cache")).appendingPathComponent("moe-gpu/\(defaultFolder)")
    if present(base) { return base }
    // Repository root from this file's path: Tests/MoETestSupport/TestSupport.swift.
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/bash")
    p.arguments = [root.appendingPathComponent("scripts/\(script)").path, base.path]
    let err = Pipe()
    p.standardError = err
    p.standardOutput = Pipe()
    try p.run()
    let message = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    if p.terminationStatus != 0 || !present(base) {
        throw XCTSkip("\(what) not in \(base.path) and could not be fetched (\(message.trimmingCharacters(in: .whitespacesAndNewlines))); run scripts/\(script) with network access")
    }
    return base
}
