import Foundation
import MoECompute
import XCTest

// Backend choice for the model tests: the rule at the top of
// Tests/MoEComputeTests/TestSupport.swift. Tests here run on the CPU backend
// unless they are OpenCL cases: named `testOpenCL...` or `...OpenCL`, getting the
// device from `TestBackends.openCLOrSkip()`, run in the OpenCL pass only.

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

enum TestBackends {
    static let openCL: Result<OpenCLBackend, Error> = {
        guard let d = DeviceCatalog().openCLDevices.first else {
            return .failure(DeviceNotFound(description: "no OpenCL platform on this machine (install pocl-opencl-icd)"))
        }
        return Result { try OpenCLBackend(device: d) }
    }()

    /// For OpenCL cases: the OpenCL backend, or an XCTSkip naming why there is
    /// none; in the CPU pass, a failure.
    static func openCLOrSkip() throws -> OpenCLBackend {
        if TestBackendSelection.current == .cpu { throw OpenCLCaseInCPUPass() }
        switch openCL {
        case .success(let b): return b
        case .failure(let e): throw XCTSkip("OpenCL tests skipped: \(e)")
        }
    }
}
