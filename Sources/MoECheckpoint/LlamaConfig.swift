import Foundation

/// Llama and Mixtral `config.json` facts.
public enum LlamaConfig {
    /// A Hugging Face Llama config rebuilt from GGUF metadata.
    static func fromGGUF(_ g: GGUFCheckpoint) -> [String: JSONValue] {
        /// GGUF stores f32; print the shortest text that round-trips through f32 (1e-05, not 9.99e-06).
        func f32(_ key: String) -> JSONValue? {
            g.doubleMetadata(key).map { v in .number(Double("\(Float(v))").map { "\($0)" } ?? "\(v)") }
        }
        var c: [String: JSONValue] = ["model_type": .string("llama"), "architectures": .array([.string("LlamaForCausalLM")]),
                                      "hidden_act": .string("silu")]
        let hidden = g.intMetadata("llama.embedding_length")
        if let v = hidden { c["hidden_size"] = .int(v) }
        if let v = g.intMetadata("llama.feed_forward_length") { c["intermediate_size"] = .int(v) }
        if let v = g.intMetadata("llama.block_count") { c["num_hidden_layers"] = .int(v) }
        c["num_attention_heads"] = .int(g.headCount)
        c["num_key_value_heads"] = .int(g.kvHeadCount)
        if let k = g.intMetadata("llama.attention.key_length") { c["head_dim"] = .int(k) }
        else if let h = hidden { c["head_dim"] = .int(h / g.headCount) }
        if let v = g.intMetadata("llama.context_length") { c["max_position_embeddings"] = .int(v) }
        c["rms_norm_eps"] = f32("llama.attention.layer_norm_rms_epsilon") ?? .number("1e-05")
        c["rope_theta"] = f32("llama.rope.freq_base") ?? .number("10000.0")
        if let v = g.intMetadata("llama.vocab_size") ?? g.descriptor("model.embed_tokens.weight")?.shape.first { c["vocab_size"] = .int(v) }
        c["tie_word_embeddings"] = .bool(g.descriptor("lm_head.weight") == nil)
        if let v = g.intMetadata("tokenizer.ggml.bos_token_id") { c["bos_token_id"] = .int(v) }
        if let v = g.intMetadata("tokenizer.ggml.eos_token_id") { c["eos_token_id"] = .int(v) }
        if let v = g.intMetadata("tokenizer.ggml.padding_token_id") { c["pad_token_id"] = .int(v) }
        return c
    }

    /// The Mixtral config transformers needs to load the upcycled checkpoint
    /// exactly as the dense Llama it came from: rope_theta, tie_word_embeddings
    /// and head_dim stated explicitly (Mixtral's defaults differ from Llama's).
    public static func mixtral(from llama: [String: JSONValue], hidden: Int, layers: Int, expertWidth: Int,
                               experts: Int, topK: Int, vocab: Int?, tied: Bool, routing: [(String, JSONValue)]) throws -> JSONValue {
        func need(_ k: String) throws -> JSONValue {
            guard let v = llama[k] else {
                throw CheckpointError(.usage, "the Llama config lacks \(k), needed for the Mixtral config.json; put the model's config.json beside the checkpoint")
            }
            return v
        }
        let heads = try need("num_attention_heads")
        let headDim = llama["head_dim"] ?? heads.intValue.map { .int(hidden / max($0, 1)) } ?? .null
        let rope = llama["rope_theta"] ?? .number("10000.0")
        var m: [(String, JSONValue)] = [
            ("architectures", .array([.string("MixtralForCausalLM")])),
            ("model_type", .string("mixtral")),
            ("hidden_size", .int(hidden)),
            ("intermediate_size", .int(expertWidth)),
            ("num_hidden_layers", .int(layers)),
            ("num_attention_heads", heads),
            ("num_key_value_heads", llama["num_key_value_heads"] ?? heads),
            ("head_dim", headDim),
            ("hidden_act", .string("silu")),
            ("max_position_embeddings", llama["max_position_embeddings"] ?? .int(4096)),
            ("rms_norm_eps", llama["rms_norm_eps"] ?? .number("1e-05")),
            ("rope_theta", rope),
            ("rope_parameters", .object([("rope_type", .string("default")), ("rope_theta", rope)])),
            ("tie_word_embeddings", .bool(tied)),
            ("vocab_size", try vocab.map { JSONValue.int($0) } ?? need("vocab_size")),
            ("num_local_experts", .int(experts)),
            ("num_experts_per_tok", .int(topK)),
            ("router_aux_loss_coef", .number("0.001")),
            ("output_router_logits", .bool(false)),
            ("router_jitter_noise", .number("0.0")),
            ("sliding_window", .null),
            ("attention_dropout", .number("0.0")),
            ("initializer_range", llama["initializer_range"] ?? .number("0.02")),
            ("use_cache", .bool(true)),
            ("torch_dtype", .string("float32")),
        ]
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] { if let v = llama[k] { m.append((k, v)) } }
        m.append(("moe_gpu_routing", .object(routing)))
        return .object(m)
    }
}
