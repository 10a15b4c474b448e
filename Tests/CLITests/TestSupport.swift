import Foundation
import XCTest
import MoETestSupport

// Backend choice for the CLI tests: the rule at the top of
// Tests/MoETestSupport/TestSupport.swift. Tests here run the binary on the CPU
// backend unless they are OpenCL cases: named `testOpenCL...` or `...OpenCL`,
// starting with `try CLI.requireOpenCL()`, run in the OpenCL pass only.

extension CLI {
    /// For OpenCL cases: returns when the binary sees an OpenCL platform, else an
    /// XCTSkip naming the fix; in the CPU pass, a failure.
    static func requireOpenCL() throws {
        if TestBackendSelection.current == .cpu { throw OpenCLCaseInCPUPass() }
        guard hasOpenCL else { throw XCTSkip("no OpenCL platform here (install pocl-opencl-icd)") }
    }
}
