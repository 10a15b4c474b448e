import Foundation
import MoECompute

/// Keys and values of every layer for one sequence, so each new token costs one
/// row of attention instead of recomputing the whole prefix. K and V are stored
/// after the rotary embedding, `[capacity, kvHeads * headDim]` per layer.
public final class KVCache {
    public let capacity: Int
    public private(set) var length = 0
    let keys: [Tensor], values: [Tensor]

    public init(model: LlamaModel, capacity: Int) throws {
        let c = model.config
        guard capacity >= 1 && capacity <= c.maxPositions else {
            throw ModelError.badInput("a KV cache of \(capacity) positions does not fit the model's context of \(c.maxPositions)")
        }
        self.capacity = capacity
        let width = c.kvHeads * c.resolvedHeadDim
        keys = try (0..<c.layers).map { _ in try model.backend.zeros([capacity, width]) }
        values = try (0..<c.layers).map { _ in try model.backend.zeros([capacity, width]) }
    }

    public func reset() { length = 0 }
    func advance(_ n: Int) { length += n }
}

extension CausalSelfAttention {
    /// Attention of `tokens` new rows of one sequence against the cache: Q by one
    /// GEMM with the Q rows of `qkv_proj`, K and V by GEMMs that write straight into
    /// the cache rows `start..<start + tokens`, RoPE on Q and the new K rows.
    func forwardCached(_ x: Tensor, tokens: Int, positions: Tensor, keys: Tensor, values: Tensor, start: Int, into out: Tensor) throws {
        let b = x.backend, d = qkv.inFeatures, qd = heads * headDim, kvd = kvHeads * headDim
        let w = qkv.weight.value
        let q = try ws.get("cachedQ", [tokens, qd])
        try b.gemm(Gemm(m: tokens, n: qd, k: d, transB: true), x, try w.view(offset: 0, shape: [qd, d]), q)
        let newK = try keys.view(offset: start * kvd, shape: [tokens, kvd]), newV = try values.view(offset: start * kvd, shape: [tokens, kvd])
        try b.gemm(Gemm(m: tokens, n: kvd, k: d, transB: true), x, try w.view(offset: qd * d, shape: [kvd, d]), newK)
        try b.gemm(Gemm(m: tokens, n: kvd, k: d, transB: true), x, try w.view(offset: (qd + kvd) * d, shape: [kvd, d]), newV)
        try b.rotary(q, heads: heads, ld: qd, column: 0, positions: positions, config: rotary, inverse: false)
        try b.rotary(newK, heads: kvHeads, ld: kvd, column: 0, positions: positions, config: rotary, inverse: false)
        let total = start + tokens
        let c = AttentionConfig(batch: 1, queryHeads: heads, kvHeads: kvHeads, queryLength: tokens, keyLength: total,
                                headDim: headDim, causal: true)
        let merged = try ws.get("cachedMerged", [tokens, qd]), lse = try ws.get("cachedLSE", [1, heads, tokens])
        try b.attention(c, q: q, k: try keys.view(offset: 0, shape: [total, kvd]), v: try values.view(offset: 0, shape: [total, kvd]),
                        out: merged, logSumExp: lse)
        try output.forward(merged, rows: tokens, into: out)
    }
}

extension LlamaModel {
    /// Feeds `ids` (one sequence) after what the cache holds and returns the
    /// next-token logits after the last of them (`[vocab]`). The prompt goes in
    /// as one call, then one token per call.
    public func decode(_ ids: [Int32], cache: KVCache) throws -> Tensor {
        let b = backend, c = config, n = ids.count, start = cache.length
        guard n >= 1 else { throw ModelError.badInput("decode needs at least one token") }
        guard start + n <= cache.capacity else {
            throw ModelError.badInput("\(start + n) tokens exceed the KV cache of \(cache.capacity) (the model's context is \(c.maxPositions))")
        }
        let ws = self.ws
        let idTensor = try ws.get("decodeIds", [1, n], dtype: .i32)
        try ids.withUnsafeBytes { try b.write($0, to: idTensor) }
        let pos = try ws.get("decodePositions", [n], dtype: .i32)
        let positions = (0..<n).map { Int32(start + $0) }
        try positions.withUnsafeBytes { try b.write($0, to: pos) }
        var h = try ws.get("decodeX", [n, c.hidden])
        try b.embedding(table: embedding.value, ids: idTensor, out: h)
        for (l, layer) in layers.enumerated() {
            let n1 = try layer.ws.get("decodeN1", [n, c.hidden]), attnOut = try layer.ws.get("decodeAttn", [n, c.hidden])
            try layer.inputNorm.forward(h, into: n1, rstd: try layer.ws.get("decodeR1", [n]))
            try layer.attention.forwardCached(n1, tokens: n, positions: pos, keys: cache.keys[l], values: cache.values[l], start: start, into: attnOut)
            let mid = try layer.ws.get("decodeMid", [n, c.hidden])
            try b.add(h, attnOut, into: mid)
            let n2 = try layer.ws.get("decodeN2", [n, c.hidden]), ffnOut = try layer.ws.get("decodeFfn", [n, c.hidden])
            try layer.postAttentionNorm.forward(mid, into: n2, rstd: try layer.ws.get("decodeR2", [n]))
            try layer.ffn.forward(n2, batch: 1, tokens: n, into: ffnOut, training: false, step: 0)
            let out = try layer.ws.get("decodeOut", [n, c.hidden])
            try b.add(mid, ffnOut, into: out)
            h = out
        }
        cache.advance(n)
        // Only the last position's logits are needed.
        let lastRow = try h.view(offset: (n - 1) * c.hidden, shape: [1, c.hidden])
        let normed = try ws.get("decodeNormed", [1, c.hidden])
        try finalNorm.forward(lastRow, into: normed, rstd: try ws.get("decodeNR", [1]))
        let logits = try ws.get("decodeLogits", [1, c.vocabSize])
        try b.gemm(Gemm(m: 1, n: c.vocabSize, k: c.hidden, transB: true), normed, headWeight.value, logits)
        return try logits.reshaped([c.vocabSize])
    }
}

/// How the next token is chosen from the logits: greedy, or temperature and
/// nucleus (top-p) sampling from a seeded generator.
public struct Sampler {
    public var temperature: Float
    public var topP: Float
    var rng: SplitMix64

    /// `temperature` 0: greedy (argmax, ties to the lower id).
    public init(temperature: Float = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.temperature = temperature; self.topP = topP; rng = SplitMix64(seed: seed)
    }

    public mutating func next(_ logits: [Float]) -> Int32 {
        guard temperature > 0 else {
            var best = 0
            for i in 1..<logits.count where logits[i] > logits[best] { best = i }
            return Int32(best)
        }
        let m = logits.max() ?? 0
        var probs = logits.map { Double(exp(($0 - m) / temperature)) }
        let z = probs.reduce(0, +)
        for i in probs.indices { probs[i] /= z }
        // Nucleus: the smallest set of most likely tokens whose mass reaches topP.
        var order = Array(probs.indices)
        order.sort { probs[$0] != probs[$1] ? probs[$0] > probs[$1] : $0 < $1 }
        var keep = order.count, mass = 0.0
        if topP < 1 {
            for (i, t) in order.enumerated() {
                mass += probs[t]
                if mass >= Double(topP) { keep = i + 1; break }
            }
        }
        let kept = order.prefix(keep)
        let total = kept.reduce(0.0) { $0 + probs[$1] }
        var u = Double(rng.next() >> 11) / Double(1 << 53) * total
        for t in kept {
            u -= probs[t]
            if u <= 0 { return Int32(t) }
        }
        return Int32(kept.last!)
    }
}
