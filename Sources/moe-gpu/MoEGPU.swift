import ArgumentParser
import Foundation
import MoECompute

@main
struct MoEGPU: ParsableCommand {
    static let version = "0.1.0"
    static let configuration = CommandConfiguration(
        commandName: "moe-gpu",
        abstract: "Turn dense checkpoints into Mixture-of-Experts models and fine-tune them on OpenCL or the CPU.",
        version: version,
        subcommands: [Train.self, Eval.self, Devices.self, Check.self, Bench.self, Inspect.self, Upcycle.self, Tokenize.self, Export.self, Generate.self, Plot.self, Experiment.self])
}
