import Foundation
import COpenCL
@testable import MoECompute
import XCTest
import MoETestSupport

final class ProgramTests: XCTestCase {
    func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("moe-gpu-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url
    }

    func testOpenCLSyntaxErrorNamesTheFileAndCarriesTheBuildLog() throws {
        let backend = try TestDevices.openCLOrSkip()
        let source = "__kernel void broken(__global float* x) { x[0] = 1.0f +; }\n"
        XCTAssertThrowsError(try CLProgram.build(file: "broken.cl", source: source, options: "", context: backend.context, cache: nil)) { error in
            guard let e = error as? KernelBuildError else { return XCTFail("expected KernelBuildError, got \(error)") }
            XCTAssertEqual(e.file, "broken.cl")
            XCTAssertTrue(e.description.contains("Kernels/broken.cl"), e.description)
            XCTAssertTrue(e.log.lowercased().contains("error"), "build log: \(e.log)")
        }
    }

    func testOpenCLProgramCacheHitsAndRebuildsCorruptEntries() throws {
        let backend = try TestDevices.openCLOrSkip()
        let cache = ProgramCache(directory: try temporaryDirectory())
        let source = "__kernel void twice(__global float* x) { x[get_global_id(0)] *= 2.0f; }\n"
        let first = try CLProgram.build(file: "twice.cl", source: source, options: "-DX=1", context: backend.context, cache: cache)
        XCTAssertFalse(first.fromCache)
        let second = try CLProgram.build(file: "twice.cl", source: source, options: "-DX=1", context: backend.context, cache: cache)
        XCTAssertTrue(second.fromCache, "second build should come from the cache")
        // Other options are another entry.
        let other = try CLProgram.build(file: "twice.cl", source: source, options: "-DX=2", context: backend.context, cache: cache)
        XCTAssertFalse(other.fromCache)

        // Corrupt every entry: the build falls back to the compiler and still works.
        for f in try FileManager.default.contentsOfDirectory(at: cache.directory, includingPropertiesForKeys: nil) {
            var bytes = try Data(contentsOf: f)
            bytes.replaceSubrange(bytes.count / 2..<bytes.count, with: Data(repeating: 0xAB, count: bytes.count - bytes.count / 2))
            try bytes.write(to: f)
        }
        let rebuilt = try CLProgram.build(file: "twice.cl", source: source, options: "-DX=1", context: backend.context, cache: cache)
        XCTAssertFalse(rebuilt.fromCache)
        let k = try rebuilt.kernel("twice")
        let t = try backend.tensor([1, 2, 3], shape: [3])
        try k.launch([.buffer(try backend.buffer(t))], global: [3])
        XCTAssertEqual(try t.floats(), [2, 4, 6])
    }

    func testEmbeddedSourcesCoverEveryKernelFile() throws {
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Kernels").standardized
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".cl") }.sorted()
        XCTAssertFalse(files.isEmpty)
        for f in files {
            XCTAssertEqual(EmbeddedKernels.sources[f], try String(contentsOf: dir.appendingPathComponent(f), encoding: .utf8),
                           "embedded copy of \(f) is stale")
        }
    }

    func testDeviceSelectorParsing() throws {
        XCTAssertEqual(try DeviceSelector(parsing: "auto"), .auto)
        XCTAssertEqual(try DeviceSelector(parsing: "CPU"), .cpu)
        XCTAssertEqual(try DeviceSelector(parsing: "opencl"), .openCL)
        XCTAssertEqual(try DeviceSelector(parsing: "opencl:1:2"), .openCLDevice(platform: 1, device: 2))
        for bad in ["gpu", "opencl:1", "opencl:a:b", "opencl:-1:0"] {
            XCTAssertThrowsError(try DeviceSelector(parsing: bad), bad)
        }
    }
}

final class OpenCLStatusNameTests: XCTestCase {
    /// Every OpenCL 1.2 status code is reported by its name; out-of-memory ones say what to do.
    func testEveryStatusHasItsName() {
        for code in Array(-19...(-1)) + Array(-68...(-30)) {
            let name = CLError.statusName(cl_int(code))
            XCTAssertTrue(name.hasPrefix("CL_"), "\(code): \(name)")
        }
        XCTAssertEqual(CLError.statusName(-54), "CL_INVALID_WORK_GROUP_SIZE")
        XCTAssertTrue(CLError.statusName(-4).contains("--batch-size"))
        XCTAssertTrue(CLError(call: "clCreateBuffer", status: -5).description.contains("CL_OUT_OF_RESOURCES"))
    }
}
