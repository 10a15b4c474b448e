import ArgumentParser
import Foundation
import MoECompute
import MoEModel

/// `moe-gpu eval`: top-1 accuracy of a trained checkpoint on a test split.
struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Evaluate a checkpoint written by moe-gpu train on a test split.")

    @Option(name: .long, help: "model.safetensors written by moe-gpu train.")
    var checkpoint: String
    @Option(name: .long, help: "Folder of MNIST-format IDX files, or a CSV image table (.csv[.gz], label last) (default Fashion-MNIST).")
    var data: String?
    @Option(name: .long, help: "Device: auto, cpu, opencl, opencl:P:D.")
    var device: String?
    @Option(name: .long, help: "Evaluate only the first N test images.")
    var limit: Int?
    @Flag(name: .long, help: "Print one JSON object.")
    var json = false

    func run() throws {
        let backend = try DeviceCatalog().makeBackend(try DeviceSelector.resolve(device))
        let config = try ModelCheckpoint.config(at: checkpoint)
        let model = try ViT(config: config, backend: backend, seed: 0)
        try ModelCheckpoint.load(checkpoint, into: model)
        let d = try BuiltinData.load(data ?? BuiltinData.fashionMNISTFolder)
        var tc = TrainConfig()
        tc.model = config
        tc.augment = false
        let trainer = try Trainer(config: tc, model: model, train: d.train, test: d.test)
        let start = Date()
        let accuracy = try trainer.evaluate(limit: limit)
        let n = min(limit ?? d.test.count, d.test.count)
        if json {
            let o: [String: Any] = ["checkpoint": checkpoint, "accuracy": accuracy, "examples": n, "device": backend.name,
                                    "seconds": Date().timeIntervalSince(start)]
            print(String(decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self))
        } else {
            print(String(format: "%@: top-1 accuracy %.2f%% on %d test images (%@)", checkpoint, 100 * accuracy, n, backend.name))
        }
    }
}
