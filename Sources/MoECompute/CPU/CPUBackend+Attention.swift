import CKernels
import Foundation

/// Fused attention on the host. The tile arithmetic is C (`ck_attention_forward`
/// and `ck_attention_backward` in Sources/CKernels/attention.c, built for
/// AVX-512, AVX2+FMA and the baseline): scores from a per-tile transposed K,
/// the softmax with an inlined polynomial exp, and the weighted sums, four query
/// rows at a time. Here: the argument checks and the split over the cores.
/// Forward: one parallel loop over (batch, query head) tiles. Backward: one
/// parallel loop over (batch, kv head) tiles, so a tile owns the dK/dV rows of its
/// kv head and sums the query heads of its group into them in a fixed order (no
/// races, deterministic); the probabilities come back from the saved
/// log-sum-exp. Scratch is allocated once per thread range, not per tile.
extension CPUBackend: AttentionOps {
    static func ckConfig(_ c: AttentionConfig) -> ck_attention_config {
        var k = ck_attention_config()
        k.batch = Int64(c.batch); k.q_heads = Int64(c.queryHeads); k.kv_heads = Int64(c.kvHeads)
        k.q_len = Int64(c.queryLength); k.k_len = Int64(c.keyLength); k.head_dim = Int64(c.headDim)
        k.causal = c.causal ? 1 : 0
        k.ldq = Int64(c.ldq); k.ldk = Int64(c.ldk); k.ldv = Int64(c.ldv); k.ldo = Int64(c.ldo)
        k.bsq = Int64(c.batchStrideQ); k.bsk = Int64(c.batchStrideK); k.bsv = Int64(c.batchStrideV); k.bso = Int64(c.batchStrideO)
        k.scale = c.scale
        return k
    }

    /// Runs `body` with a 64-byte aligned scratch of `floats` floats.
    @inline(__always)
    static func withAttentionScratch(_ floats: Int, _ body: (UnsafeMutablePointer<Float>) -> Void) {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(floats, 16) * MemoryLayout<Float>.stride, alignment: 64)
        defer { raw.deallocate() }
        body(raw.bindMemory(to: Float.self, capacity: max(floats, 16)))
    }

    public func attention(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor) throws {
        try AttentionCheck.forward(c, q: q, k: k, v: v, out: out, logSumExp: logSumExp)
        let pq = try f32(q), pk = try f32(k), pv = try f32(v), po = try f32(out), pl = try f32(logSumExp)
        let tiles = c.batch * c.queryHeads
        guard tiles > 0, c.queryLength > 0 else { counters.launch(); return }
        var kc = Self.ckConfig(c)
        let scratch = ck_attention_forward_scratch(&kc)
        parallelFor(tiles, work: tiles * c.queryLength * max(c.keyLength, 1) * c.headDim) { range in
            var kc = kc
            Self.withAttentionScratch(scratch) { s in
                ck_attention_forward(&kc, pq, pk, pv, po, pl, Int64(range.lowerBound), Int64(range.upperBound), s)
            }
        }
    }

    public func attentionBackward(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor,
                                  dOut: Tensor, dQ: Tensor, dK: Tensor, dV: Tensor) throws {
        try AttentionCheck.backward(c, q: q, k: k, v: v, out: out, logSumExp: logSumExp, dOut: dOut, dQ: dQ, dK: dK, dV: dV)
        let pq = try f32(q), pk = try f32(k), pv = try f32(v), po = try f32(out), pl = try f32(logSumExp)
        let pdo = try f32(dOut), pdq = try f32(dQ), pdk = try f32(dK), pdv = try f32(dV)
        let tiles = c.batch * c.kvHeads
        guard tiles > 0 else { counters.launch(); return }
        var kc = Self.ckConfig(c)
        let scratch = ck_attention_backward_scratch(&kc)
        parallelFor(tiles, work: c.batch * c.queryHeads * max(c.queryLength, 1) * max(c.keyLength, 1) * c.headDim * 2) { range in
            var kc = kc
            Self.withAttentionScratch(scratch) { s in
                ck_attention_backward(&kc, pq, pk, pv, po, pl, pdo, pdq, pdk, pdv,
                                      Int64(range.lowerBound), Int64(range.upperBound), s)
            }
        }
    }
}
