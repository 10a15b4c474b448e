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

/// A bad option value found while a command runs: printed as one `Error:` line
/// (ArgumentParser's ValidationError would add a usage line for the wrong command).
struct CommandError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}
