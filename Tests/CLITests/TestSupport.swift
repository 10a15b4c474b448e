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

extension CLI {
    /// A tiny ViT training config (width 16, 2 blocks, a top-2 of 4 MoE in block 1,
    /// 4 steps of 16 images, evaluations every 2 steps on 100 images), written as
    /// `dir/NAME.json` with `replacing` applied to its text.
    static func smallTrainConfig(in dir: URL, name: String = "config", lr: Double = 0.002,
                                 replacing replacements: [String: String] = [:]) throws -> URL {
        var config = """
            {"model": {"imageSize": 28, "channels": 1, "patchSize": 7, "width": 16, "depth": 2, "heads": 2, "mlpRatio": 2,
                       "classes": 10, "pool": "mean", "moeBlocks": [1],
                       "moe": {"router": "topk", "experts": 4, "topK": 2, "gateOrder": "softmax-topk", "renormalize": true,
                               "dropPolicy": "position", "jitter": 0, "auxLossCoefficient": 0.01, "zLossCoefficient": 0.001,
                               "expertWidthRatio": 1, "dropout": 0, "slotsPerExpert": 1, "coreExperts": 0,
                               "universalWidthRatio": 0.25, "temperatureInit": 0.5, "stochasticDepth": 0}},
             "testExamples": 100, "batchSize": 16, "steps": 4, "learningRate": \(lr), "minLearningRate": 0, "warmupSteps": 1,
             "weightDecay": 0.05, "beta1": 0.9, "beta2": 0.999, "clipNorm": 1, "labelSmoothing": 0.1,
             "gradientAccumulation": 1, "evalEvery": 2, "logEvery": 1, "augment": false, "seed": 0}
            """
        for (from, to) in replacements { config = config.replacingOccurrences(of: from, with: to) }
        let url = dir.appendingPathComponent("\(name).json")
        try config.write(to: url, atomically: true, encoding: .utf8)
        return url
    }
}

extension CLI {
    static let mpirunPath = "/usr/bin/mpirun"

    /// `mpirun -np RANKS COMMAND...` as root may run it, on as many cores as there are.
    static func mpirun(ranks: Int, _ command: [String]) throws -> Result {
        try run(["--allow-run-as-root", "--oversubscribe", "-np", "\(ranks)"] + command, binary: URL(fileURLWithPath: mpirunPath))
    }
}
