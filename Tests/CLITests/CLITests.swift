import Foundation
import XCTest

/// Runs the built `moe-gpu` binary as a user would.
enum CLI {
    static var binary: URL { Bundle.main.bundleURL.appendingPathComponent("moe-gpu") }

    struct Result { let status: Int32; let stdout: String; let stderr: String }

    static func run(_ args: [String], binary: URL = CLI.binary, environment: [String: String] = [:],
                    directory: URL? = nil) throws -> Result {
        let p = Process()
        p.executableURL = binary
        p.arguments = args
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        if let directory { p.currentDirectoryURL = directory }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out; p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    static func temporaryDirectory(_ test: XCTestCase) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("moe-gpu-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        test.addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url
    }

    static var hasOpenCL: Bool {
        (try? run(["devices", "--json"]).stdout.contains("\"opencl:")) ?? false
    }
}

final class DevicesCommandTests: XCTestCase {
    func testVersionAndHelp() throws {
        let v = try CLI.run(["--version"])
        XCTAssertEqual(v.status, 0)
        XCTAssertFalse(v.stdout.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
        for sub in ["devices", "check"] {
            let h = try CLI.run([sub, "--help"])
            XCTAssertEqual(h.status, 0, sub)
            XCTAssertTrue(h.stdout.contains("USAGE"), sub)
        }
    }

    func testNoOpenCLPlatformStillListsTheCPUBackend() throws {
        let empty = try CLI.temporaryDirectory(self)
        let r = try CLI.run(["devices"], environment: ["OCL_ICD_VENDORS": empty.path])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("No OpenCL platform"), r.stdout)
        XCTAssertTrue(r.stdout.contains("cpu  CPU backend"), r.stdout)
        XCTAssertTrue(r.stdout.contains("auto -> cpu"), r.stdout)
        let check = try CLI.run(["check"], environment: ["OCL_ICD_VENDORS": empty.path])
        XCTAssertEqual(check.status, 0, check.stderr)
        XCTAssertTrue(check.stdout.contains("PASS  cpu"), check.stdout)
    }

    func testDevicesJSONListsTheCPUBackendAndOpenCL() throws {
        let r = try CLI.run(["devices", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let object = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        let devices = object?["devices"] as? [[String: Any]] ?? []
        XCTAssertTrue(devices.contains { $0["selector"] as? String == "cpu" })
        try CLI.requireOpenCL()   // the PoCL listing
        let cl = devices.first { ($0["selector"] as? String)?.hasPrefix("opencl:") == true }
        XCTAssertNotNil(cl?["max_work_group_size"])
        XCTAssertNotNil(cl?["opencl_c_version"])
    }

    func testUnknownDeviceIsAClearError() throws {
        let r = try CLI.run(["check", "--device", "tpu"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("unknown device 'tpu'"), r.stderr)
    }

    func testOpenCLBrokenKernelFolderShowsFileAndBuildLog() throws {
        try CLI.requireOpenCL()
        let dir = try CLI.temporaryDirectory(self)
        try "__kernel void gemm(__global float* c) { c[0] = ; }\n".write(to: dir.appendingPathComponent("gemm.cl"), atomically: true, encoding: .utf8)
        try "__kernel void fill_f32(__global float* x, int o, int n, float v) { if (get_global_id(0) < n) x[o + get_global_id(0)] = v; }\n"
            .write(to: dir.appendingPathComponent("elementwise.cl"), atomically: true, encoding: .utf8)
        let cache = try CLI.temporaryDirectory(self)
        let r = try CLI.run(["check", "--device", "opencl"], environment: ["MOE_GPU_KERNELS": dir.path, "XDG_CACHE_HOME": cache.path])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("Kernels/gemm.cl"), r.stderr)
        XCTAssertTrue(r.stderr.lowercased().contains("error"), r.stderr)

        // A run whose kernels do not build leaves no half-written run folder.
        guard FileManager.default.fileExists(atPath: "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") else { return }
        // Every kernel file, nn.cl broken: the model builds, its first step fails.
        let kernels = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Kernels").standardized
        let broken = try CLI.temporaryDirectory(self), out = dir.appendingPathComponent("run")
        for file in try FileManager.default.contentsOfDirectory(atPath: kernels.path) where file.hasSuffix(".cl") {
            var text = try String(contentsOf: kernels.appendingPathComponent(file), encoding: .utf8)
            if file == "nn.cl" { text += "\n__kernel void broken( { }\n" }
            try text.write(to: broken.appendingPathComponent(file), atomically: true, encoding: .utf8)
        }
        let t = try CLI.run(["train", "--config", try CLI.smallTrainConfig(in: dir).path, "--device", "opencl", "--out", out.path],
                            environment: ["MOE_GPU_KERNELS": broken.path, "XDG_CACHE_HOME": cache.path])
        XCTAssertEqual(t.status, 1, t.stderr)
        XCTAssertTrue(t.stderr.contains("Kernels/nn.cl"), t.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path), "a failed start left \(out.path)")
    }

    /// The binary embeds its kernels: a lone copy in an empty folder builds them.
    func testOpenCLBinaryCopiedAloneBuildsItsKernels() throws {
        try CLI.requireOpenCL()
        let dir = try CLI.temporaryDirectory(self), elsewhere = try CLI.temporaryDirectory(self), cache = try CLI.temporaryDirectory(self)
        let copy = dir.appendingPathComponent("moe-gpu")
        try FileManager.default.copyItem(at: CLI.binary, to: copy)
        var env = ["XDG_CACHE_HOME": cache.path]
        env["MOE_GPU_KERNELS"] = ""
        let r = try CLI.run(["check", "--device", "opencl"], binary: copy, environment: env, directory: elsewhere)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("PASS  opencl:"), r.stdout)
        let cached = try FileManager.default.contentsOfDirectory(atPath: cache.appendingPathComponent("moe-gpu").path)
        XCTAssertFalse(cached.isEmpty, "compiled programs should be cached")
    }
}
