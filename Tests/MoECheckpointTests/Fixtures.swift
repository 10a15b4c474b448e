import Foundation
import MoECompute
import XCTest
@testable import MoECheckpoint

/// A fresh temporary folder per test, removed afterwards.
func makeTempDir(_ test: XCTestCase) throws -> URL {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moe-ckpt-tests-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
    return dir
}

/// Seeded values in [-1, 1].
func randomFloats(_ n: Int, seed: UInt64, scale: Float = 1) -> [Float] {
    var r = SplitMix64(seed: seed)
    return (0..<n).map { _ in r.nextFloat(in: -1...1) * scale }
}

func f32Data(_ v: [Float]) -> Data { v.withUnsafeBytes { Data($0) } }

/// A safetensors file from a raw header string and buffer, for malformed-input tests.
func rawSafetensors(header: String, buffer: Data, headerLength: UInt64? = nil) -> Data {
    let h = Data(header.utf8)
    var n = (headerLength ?? UInt64(h.count)).littleEndian
    var d = Data(bytes: &n, count: 8)
    d.append(h)
    d.append(buffer)
    return d
}

/// Tensors of a small synthetic model.
typealias NamedTensor = (name: String, dtype: StorageDType, shape: [Int], data: Data)

func tensor(_ name: String, _ shape: [Int], seed: UInt64, scale: Float = 0.5) -> NamedTensor {
    (name, .F32, shape, f32Data(randomFloats(shape.reduce(1, *), seed: seed, scale: scale)))
}

/// A BERT-like checkpoint: 2 layers, H=12, I=24, plus an I64 buffer like MiniLM's position_ids.
func writeBertLike(to url: URL, layers: Int = 2, hidden: Int = 12, ffn: Int = 24) throws {
    var ts: [NamedTensor] = []
    let ids: [Int64] = Array(0..<8)
    ts.append(("embeddings.position_ids", .I64, [1, 8], ids.withUnsafeBytes { Data($0) }))
    ts.append(tensor("embeddings.word_embeddings.weight", [20, hidden], seed: 1))
    var s: UInt64 = 10
    for l in 0..<layers {
        let p = "encoder.layer.\(l)."
        for (n, shape) in [("attention.self.query.weight", [hidden, hidden]), ("attention.output.LayerNorm.weight", [hidden]),
                           ("intermediate.dense.weight", [ffn, hidden]), ("intermediate.dense.bias", [ffn]),
                           ("output.dense.weight", [hidden, ffn]), ("output.dense.bias", [hidden]),
                           ("output.LayerNorm.weight", [hidden])] {
            s += 1
            ts.append(tensor(p + n, shape, seed: s))
        }
    }
    try writeSafetensors(to: url, tensors: ts, metadata: ["format": "pt"])
}

/// Llama tensors in Hugging Face names and order: H=16, I=32, 2 heads, 1 KV head, vocab 10.
func llamaTensors(layers: Int = 2, hidden: Int = 16, ffn: Int = 32, heads: Int = 2, kvHeads: Int = 1) -> [(String, [Int], [Float])] {
    let hd = hidden / heads
    var ts: [(String, [Int], [Float])] = []
    var s: UInt64 = 100
    func add(_ n: String, _ shape: [Int]) { s += 1; ts.append((n, shape, randomFloats(shape.reduce(1, *), seed: s, scale: 0.5))) }
    add("model.embed_tokens.weight", [10, hidden])
    for l in 0..<layers {
        let p = "model.layers.\(l)."
        add(p + "input_layernorm.weight", [hidden])
        add(p + "self_attn.q_proj.weight", [heads * hd, hidden])
        add(p + "self_attn.k_proj.weight", [kvHeads * hd, hidden])
        add(p + "self_attn.v_proj.weight", [kvHeads * hd, hidden])
        add(p + "self_attn.o_proj.weight", [hidden, heads * hd])
        add(p + "post_attention_layernorm.weight", [hidden])
        add(p + "mlp.gate_proj.weight", [ffn, hidden])
        add(p + "mlp.up_proj.weight", [ffn, hidden])
        add(p + "mlp.down_proj.weight", [hidden, ffn])
    }
    add("model.norm.weight", [hidden])
    return ts
}

func llamaConfigJSON(layers: Int = 2, hidden: Int = 16, ffn: Int = 32, heads: Int = 2, kvHeads: Int = 1) -> String {
    """
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": \(hidden), "intermediate_size": \(ffn),
     "num_hidden_layers": \(layers), "num_attention_heads": \(heads), "num_key_value_heads": \(kvHeads),
     "rope_theta": 100000.0, "rms_norm_eps": 1e-05, "max_position_embeddings": 2048, "vocab_size": 10,
     "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    """
}

/// A Llama-like safetensors checkpoint with its config.json, in folder `dir`.
func writeLlamaLike(in dir: URL, layers: Int = 2) throws -> URL {
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    let url = dir.appendingPathComponent("model.safetensors")
    try writeSafetensors(to: url, tensors: llamaTensors(layers: layers).map { ($0.0, .F32, $0.1, f32Data($0.2)) })
    try Data(llamaConfigJSON(layers: layers).utf8).write(to: dir.appendingPathComponent("config.json"))
    return url
}

/// Builds GGUF v3 files byte by byte (the reader under test is not used to make them).
struct GGUFBuilder {
    var version: UInt32 = 3
    var alignment = 32
    var kv: [(String, Data)] = []
    var tensors: [(name: String, dims: [Int], type: UInt32, data: Data)] = []

    static func str(_ s: String) -> Data {
        var n = UInt64(s.utf8.count).littleEndian
        var d = Data(bytes: &n, count: 8); d.append(Data(s.utf8)); return d
    }
    static func le<T: FixedWidthInteger>(_ v: T) -> Data { var x = v.littleEndian; return Data(bytes: &x, count: MemoryLayout<T>.size) }

    mutating func addString(_ k: String, _ v: String) { kv.append((k, Self.le(UInt32(8)) + Self.str(v))) }
    mutating func addU32(_ k: String, _ v: UInt32) { kv.append((k, Self.le(UInt32(4)) + Self.le(v))) }
    mutating func addF32(_ k: String, _ v: Float) { kv.append((k, Self.le(UInt32(6)) + Self.le(v.bitPattern))) }
    mutating func addStringArray(_ k: String, _ v: [String]) {
        var d = Self.le(UInt32(9)) + Self.le(UInt32(8)) + Self.le(UInt64(v.count))
        for s in v { d += Self.str(s) }
        kv.append((k, d))
    }

    func build() -> Data {
        var d = Data("GGUF".utf8)
        d += Self.le(version) + Self.le(UInt64(tensors.count)) + Self.le(UInt64(kv.count))
        for (k, v) in kv { d += Self.str(k) + v }
        var offset = 0
        var offsets: [Int] = []
        for t in tensors {
            offsets.append(offset)
            offset += (t.data.count + alignment - 1) / alignment * alignment
        }
        for (t, o) in zip(tensors, offsets) {
            d += Self.str(t.name) + Self.le(UInt32(t.dims.count))
            for x in t.dims { d += Self.le(UInt64(x)) }
            d += Self.le(t.type) + Self.le(UInt64(o))
        }
        while d.count % alignment != 0 { d.append(0) }
        for t in tensors {
            d += t.data
            while d.count % alignment != 0 { d.append(0) }
        }
        return d
    }
}

/// llama.cpp's converter permutation of Q/K rows, written as in convert_hf_to_gguf.py:
/// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
func llamaCppPermute(_ w: [Float], rows: Int, cols: Int, heads: Int) -> [Float] {
    let half = rows / heads / 2
    var out = [Float](repeating: 0, count: w.count)
    // out[h][j][i] = w[h][i][j]
    for h in 0..<heads { for j in 0..<half { for i in 0..<2 {
        let dst = ((h * half + j) * 2 + i) * cols, src = ((h * 2 + i) * half + j) * cols
        for c in 0..<cols { out[dst + c] = w[src + c] }
    } } }
    return out
}

/// A Llama GGUF made from `llamaTensors`, F32 except the MLP down projections in Q8_0 of 32-wide rows.
func writeLlamaGGUF(to url: URL, layers: Int = 2) throws -> [(String, [Int], [Float])] {
    let hf = llamaTensors(layers: layers)
    var b = GGUFBuilder()
    b.addString("general.architecture", "llama")
    b.addU32("llama.block_count", UInt32(layers))
    b.addU32("llama.embedding_length", 16)
    b.addU32("llama.feed_forward_length", 32)
    b.addU32("llama.attention.head_count", 2)
    b.addU32("llama.attention.head_count_kv", 1)
    b.addU32("llama.context_length", 2048)
    b.addF32("llama.rope.freq_base", 100000)
    b.addF32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    b.addStringArray("tokenizer.ggml.tokens", (0..<10).map { "t\($0)" })
    let toGGUF: [String: String] = ["model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"]
    let parts = ["input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"]
    for (name, shape, values) in hf {
        var gname = toGGUF[name] ?? name
        if name.hasPrefix("model.layers.") {
            let rest = name.dropFirst("model.layers.".count)
            let l = rest.prefix { $0 != "." }
            let inner = String(rest.dropFirst(l.count + 1).dropLast(".weight".count))
            gname = "blk.\(l).\(parts[inner]!).weight"
        }
        var v = values
        if name.hasSuffix("q_proj.weight") { v = llamaCppPermute(v, rows: shape[0], cols: shape[1], heads: 2) }
        if name.hasSuffix("k_proj.weight") { v = llamaCppPermute(v, rows: shape[0], cols: shape[1], heads: 1) }
        b.tensors.append((gname, shape.reversed(), 0, f32Data(v)))
    }
    try b.build().write(to: url)
    return hf
}

/// The built `moe-gpu` binary, next to the test bundle.
func moeGPUBinary() -> URL {
    let candidates = [URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent(),
                      Bundle.main.bundleURL, Bundle.main.bundleURL.deletingLastPathComponent()]
    for c in candidates {
        let u = c.appendingPathComponent("moe-gpu")
        if FileManager.default.isExecutableFile(atPath: u.path) { return u }
    }
    return candidates[0].appendingPathComponent("moe-gpu")
}

/// Runs the CLI; returns exit status, stdout, stderr.
func runCLI(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = moeGPUBinary()
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

/// Files left in a folder (hidden temporaries included).
func filesIn(_ dir: URL) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).sorted()
}
