import ArgumentParser
import Foundation
import MoECheckpoint

/// `moe-gpu inspect`: what a checkpoint is, before anything is done to it.
struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Describe a safetensors or GGUF checkpoint: architecture, layers, sizes, dtypes, parameters, MoE routing.")

    @Argument(help: "A .safetensors file, a model.safetensors.index.json, a folder holding either, or a .gguf file.")
    var file: String

    @Flag(name: .long, help: "Print one JSON object instead of text.")
    var json = false

    func run() throws {
        let summary = try CheckpointSummary(path: file)
        print(json ? summary.json.serialized(pretty: true) : summary.text)
    }
}
