import Foundation
import MoECompute
import XCTest

/// Every Kernels/*.cl file compiles for real GPU targets (NVIDIA PTX and AMD
/// gfx90a) with clang-15, which comes with PoCL: once with the defaults and once
/// with each GPU tile profile's options (`KernelTuning.gpuProfiles`), so code the
/// CPU OpenCL device in CI never builds (a GPU-only tile size, a builtin PoCL
/// accepts but a GPU compiler does not) fails here. Pure host: runs in the CPU pass.
final class GPUCompileTests: XCTestCase {
    static let clang = "/usr/bin/clang-15"
    static let targets: [(name: String, args: [String])] = [
        ("nvptx64-nvidia-nvcl", ["-target", "nvptx64-nvidia-nvcl"]),
        ("amdgcn-amd-amdhsa gfx90a", ["-target", "amdgcn-amd-amdhsa", "-mcpu=gfx90a", "-nogpulib"]),
    ]

    struct Job {
        let file: URL, target: String, targetArgs: [String], label: String, options: [String]
        var arguments: [String] {
            targetArgs + options + ["-Xclang", "-finclude-default-header", "-S", "-O2", "-o", "/dev/null", file.path]
        }
    }

    func testEveryKernelFileCompilesForNVIDIAAndAMDGPUs() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.clang) else {
            throw XCTSkip("\(Self.clang) is not installed (it comes with PoCL: apt-get install clang-15)")
        }
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Kernels").standardized
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".cl") }.sorted()
        XCTAssertFalse(files.isEmpty, "no .cl files in \(dir.path)")

        // The defaults, then each profile's options; profiles giving the same options compile once.
        var jobs: [Job] = []
        for file in files {
            var optionSets: [(label: String, options: String)] = [("defaults", "-cl-std=CL1.2")]
            for (name, tuning) in KernelTuning.gpuProfiles {
                let options = tuning.options(for: file)
                if let i = optionSets.firstIndex(where: { $0.options == options }) {
                    optionSets[i].label += ", \(name)"
                } else {
                    optionSets.append((name, options))
                }
            }
            for target in Self.targets {
                for set in optionSets {
                    let options = set.options.split(separator: " ").map(String.init)
                    jobs.append(Job(file: dir.appendingPathComponent(file), target: target.name, targetArgs: target.args,
                                    label: set.label, options: options))
                }
            }
        }

        var results = [(status: Int32, output: String)?](repeating: nil, count: jobs.count)
        let lock = NSLock()
        let start = Date()
        DispatchQueue.concurrentPerform(iterations: jobs.count) { i in
            let r = Self.run(jobs[i])
            lock.lock(); results[i] = r; lock.unlock()
        }
        for (job, result) in zip(jobs, results) {
            guard let result else { XCTFail("\(job.file.lastPathComponent): not run"); continue }
            if result.status != 0 {
                XCTFail("""
                    Kernels/\(job.file.lastPathComponent) does not compile for \(job.target) with \(job.label) \
                    (\(job.options.joined(separator: " "))), exit status \(result.status):
                    \(Self.clang) \(job.arguments.joined(separator: " "))
                    \(result.output)
                    """)
            }
        }
        print("GPUCompileTests: \(jobs.count) compiles (\(files.count) files x \(Self.targets.count) targets x option sets) "
              + "in \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
    }

    static func run(_ job: Job) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: clang)
        p.arguments = job.arguments
        let pipe = Pipe()
        p.standardOutput = pipe; p.standardError = pipe
        do { try p.run() } catch { return (-1, "could not start \(clang): \(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
