import MoETestSupport

// Backend choice for the model tests: the rule at the top of
// Tests/MoETestSupport/TestSupport.swift. Tests here run on the CPU backend
// unless they are OpenCL cases: named `testOpenCL...` or `...OpenCL`, getting the
// device from `TestBackends.openCLOrSkip()`, run in the OpenCL pass only.
typealias TestBackends = TestDevices
