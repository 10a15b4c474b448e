import ArgumentParser
import Foundation
import MoECompute
import MoEModel

@main
struct MoEGPU: ParsableCommand {
    static let version = "0.1.0"
    static let configuration = CommandConfiguration(
        commandName: "moe-gpu",
        abstract: "Turn dense checkpoints into Mixture-of-Experts models and fine-tune them on OpenCL or the CPU.",
        version: version,
        subcommands: [Train.self, Eval.self, Devices.self, Check.self, Bench.self, Inspect.self, Upcycle.self, Tokenize.self, Export.self, Generate.self, Plot.self, Experiment.self])

    /// ArgumentParser's `main` with every failure as one `Error:` line on stderr
    /// (its parse errors add help and usage lines); help and --version as usual.
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        do {
            var command = try parseAsRoot(arguments)
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            let text = message(for: error)
            if !text.isEmpty {
                // Errors of a running command keep their text (an OpenCL build log spans lines).
                let line = code == .validationFailure ? oneLine(text, arguments: arguments) : text
                FileHandle.standardError.write(Data("Error: \(line)\n".utf8))
            }
            Foundation.exit(code.rawValue)
        }
    }

    /// A parse error on one line; "--steps -3" reads as a missing value (an
    /// option-like argument), so that case says what was wrong.
    static func oneLine(_ message: String, arguments: [String]) -> String {
        if message.hasPrefix("Missing value for '"), let option = message.dropFirst(19).split(separator: " ").first,
           let i = arguments.firstIndex(of: String(option)), i + 1 < arguments.count,
           arguments[i + 1].hasPrefix("-"), Double(arguments[i + 1]) != nil {
            return "\(option) \(arguments[i + 1]): must not be negative"
        }
        return MoEModel.oneLine(message) + (message.contains("--help") ? "" : " (see --help)")
    }
}

/// A bad option value found while a command runs: printed as one `Error:` line
/// (ArgumentParser's ValidationError would add a usage line for the wrong command).
struct CommandError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}
