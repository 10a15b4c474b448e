import ArgumentParser
import Foundation
import MoECompute
import MoEModel
import MoETokenizer

/// `moe-gpu generate`: text from a language model with a KV cache, printed as it comes.
struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text with a language model (GGUF, Hugging Face folder, or a moe-gpu LM checkpoint or run folder).")

    @Option(name: .long, help: "The model: a GGUF file, a Hugging Face folder, a moe-gpu model.safetensors or run folder.")
    var checkpoint: String
    @Option(name: .long, help: "The prompt.")
    var prompt: String
    @Flag(name: .long, help: "Wrap the prompt as a ChatML user turn and answer as the assistant.")
    var chat = false
    @Option(name: .long, help: "Tokens to generate at most (stops earlier at EOS).")
    var maxNewTokens = 64
    @Option(name: .long, help: "0: greedy; else sample at this temperature.")
    var temperature: Float = 0
    @Option(name: .long, help: "Nucleus sampling: keep the most likely tokens up to this probability mass.")
    var topP: Float = 1
    @Option(name: .long, help: "Seed of the sampler.")
    var seed: UInt64 = 0
    @Option(name: .long, help: "Device: auto, cpu, opencl, opencl:P:D.")
    var device: String?
    @Flag(name: .long, help: "Print one JSON object (ids, text, tokens/s) at the end instead of streaming.")
    var json = false

    func run() throws {
        setvbuf(stdout, nil, _IONBF, 0)
        let backend = try DeviceCatalog().makeBackend(try DeviceSelector.resolve(device))
        let (source, config) = try LlamaCheckpoint.open(checkpoint)
        let (tokenizer, _) = try LMRecipe.tokenizer(config.tokenizer)
        let model = try LlamaModel(config: config, backend: backend, seed: 0, sequenceLength: 1, training: false, initialize: false)
        try LlamaCheckpoint.load(source, into: model)
        var text = prompt
        var stops: Set<Int32> = Set([config.eosID, tokenizer.eosID].compactMap { $0 })
        if chat {
            let end = tokenizer.encode("<|im_end|>")
            guard end.count == 1, tokenizer.encode("<|im_start|>").count == 1 else {
                throw CommandError("--chat needs a tokenizer with ChatML's <|im_start|> and <|im_end|> tokens; this model's has none")
            }
            stops.insert(end[0])
            text = "<|im_start|>user\n\(prompt)<|im_end|>\n<|im_start|>assistant\n"
        }
        let ids = tokenizer.encode(text)
        guard !ids.isEmpty else { throw CommandError("the prompt is empty") }
        guard ids.count < config.maxPositions else {
            throw CommandError("the prompt is \(ids.count) tokens; the model's context is \(config.maxPositions)")
        }
        let capacity = min(config.maxPositions, ids.count + maxNewTokens)
        let cache = try KVCache(model: model, capacity: capacity)
        var sampler = Sampler(temperature: temperature, topP: topP, seed: seed)
        let start = Date()
        var logits = try model.decode(ids, cache: cache).floats()
        let promptSeconds = Date().timeIntervalSince(start)
        var generated: [Int32] = []
        let decodeStart = Date()
        while generated.count < maxNewTokens {
            let next = sampler.next(logits)
            if stops.contains(next) { break }
            generated.append(next)
            if !json { FileHandle.standardOutput.write(Data(tokenizer.decode([next]))) }
            if cache.length >= capacity { break }
            logits = try model.decode([next], cache: cache).floats()
        }
        let seconds = Date().timeIntervalSince(decodeStart)
        let rate = Double(generated.count) / max(seconds, 1e-9)
        if json {
            let o: [String: Any] = ["prompt_ids": ids, "ids": generated, "text": tokenizer.decodeText(generated),
                                    "tokens_per_s": rate, "prompt_seconds": promptSeconds, "device": backend.name]
            print(String(decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self))
        } else {
            print("")
            FileHandle.standardError.write(Data(String(format: "[%d prompt tokens in %.2f s; %d new tokens at %.1f tokens/s on %@]\n",
                                                       ids.count, promptSeconds, generated.count, rate, backend.name).utf8))
        }
    }
}
