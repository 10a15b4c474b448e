import PackagePlugin
import Foundation

/// Embeds every `Kernels/*.cl` file into the MoECompute module as a Swift
/// string, so that a copy of the `moe-gpu` binary alone can build its kernels.
@main
struct EmbedKernelsPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let kernelsDir = context.package.directoryURL.appending(path: "Kernels")
        let names = (try? FileManager.default.contentsOfDirectory(atPath: kernelsDir.path)) ?? []
        let inputs = names.filter { $0.hasSuffix(".cl") || $0.hasSuffix(".h") }.sorted()
            .map { kernelsDir.appending(path: $0) }
        let output = context.pluginWorkDirectoryURL.appending(path: "EmbeddedKernels.swift")
        return [.buildCommand(
            displayName: "Embedding \(inputs.count) OpenCL kernel sources",
            executable: try context.tool(named: "embed-kernels").url,
            arguments: [output.path] + inputs.map(\.path),
            inputFiles: inputs,
            outputFiles: [output])]
    }
}
