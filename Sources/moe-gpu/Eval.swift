import ArgumentParser
import Foundation
import MoECompute
import MoEModel

/// `moe-gpu eval`: top-1 accuracy of a trained ViT on a test split, or loss and
/// perplexity of a language model on a text (LanguageModelCommands.swift); which
/// one is decided by what the checkpoint is.
struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Evaluate a checkpoint: a ViT's accuracy on a test split, or a language model's loss and perplexity on a text.",
        discussion: """
            A ViT checkpoint written by moe-gpu train (moe-gpu.config metadata) is scored on --data \
            (default Fashion-MNIST). Anything else is a language model: a GGUF file, a Hugging Face \
            folder (Llama, Mistral-style or Mixtral), a moe-gpu language-model model.safetensors or run \
            folder. Its --data text is tokenised (BOS first only with --bos) and cut into non-overlapping \
            windows of --seq-len tokens; every position of a window but the last predicts the next token, \
            and the loss is the mean over all predicted positions (transformers' labels=input_ids per \
            window, summed by token counts); perplexity = exp(loss).
            """)

    @Option(name: .long, help: "ViT: model.safetensors written by moe-gpu train. Language model: GGUF, Hugging Face folder, moe-gpu model.safetensors or run folder.")
    var checkpoint: String
    @Option(name: .long, help: "ViT: folder of MNIST-format IDX files, or a CSV image table (.csv[.gz], label last) (default Fashion-MNIST). Language model: a UTF-8 text file (required).")
    var data: String?
    @Option(name: .long, help: "Device: auto, cpu, opencl, opencl:P:D.")
    var device: String?
    @Option(name: .long, help: "Evaluate only the first N test images (ViT) or windows (language model).")
    var limit: Int?
    @Option(name: .customLong("seq-len"), help: "Language model: tokens per window (default the smaller of 1024 and the model's context).")
    var seqLen: Int?
    @Flag(name: .long, help: "Language model: put the tokenizer's BOS id before the text's first token.")
    var bos = false
    @Flag(name: .long, help: "Print one JSON object.")
    var json = false

    func run() throws {
        if LMFiles.isViT(checkpoint) { return try runViT(LMFiles.modelFile(checkpoint)) }
        try runLanguageModel()
    }

    func runViT(_ path: String) throws {
        if seqLen != nil || bos {
            throw LMCommandError("--seq-len and --bos are for language models; \(checkpoint) is a ViT")
        }
        let backend = try DeviceCatalog().makeBackend(try DeviceSelector.resolve(device))
        let config = try ModelCheckpoint.config(at: path)
        let model = try ViT(config: config, backend: backend, seed: 0)
        try ModelCheckpoint.load(path, into: model)
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
