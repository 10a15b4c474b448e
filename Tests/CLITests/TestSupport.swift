import Foundation
import XCTest

// Backend choice for the CLI tests: the rule at the top of
// Tests/MoEComputeTests/TestSupport.swift. Tests here run the binary on the CPU
// backend unless they are OpenCL cases: named `testOpenCL...` or `...OpenCL`,
// starting with `try CLI.requireOpenCL()`, run in the OpenCL pass only.

/// MOE_GPU_TEST_BACKENDS = all (default) | cpu | opencl.
enum TestBackendSelection: String {
    case all, cpu, opencl

    static let current: TestBackendSelection = {
        let raw = ProcessInfo.processInfo.environment["MOE_GPU_TEST_BACKENDS"] ?? ""
        if raw.isEmpty { return .all }
        guard let s = TestBackendSelection(rawValue: raw.lowercased()) else {
            fatalError("MOE_GPU_TEST_BACKENDS=\(raw): expected all, cpu or opencl")
        }
        return s
    }()
}

/// An OpenCL case ran in the CPU pass: a failure, never a skip.
struct OpenCLCaseInCPUPass: Error, CustomStringConvertible {
    var description: String {
        "an OpenCL case ran with MOE_GPU_TEST_BACKENDS=cpu: name it testOpenCL... or ...OpenCL so the CPU pass "
            + "leaves it out (rule at the top of Tests/MoEComputeTests/TestSupport.swift)"
    }
}

extension CLI {
    /// For OpenCL cases: returns when the binary sees an OpenCL platform, else an
    /// XCTSkip naming the fix; in the CPU pass, a failure.
    static func requireOpenCL() throws {
        if TestBackendSelection.current == .cpu { throw OpenCLCaseInCPUPass() }
        guard hasOpenCL else { throw XCTSkip("no OpenCL platform here (install pocl-opencl-icd)") }
    }
}
