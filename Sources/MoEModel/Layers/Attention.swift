import MoECompute

/// Multi-head self-attention over `[B, T, D]` with the backend's fused
/// attention op: qkv = x Wqkv^T + b (one GEMM, rows laid out `[Q heads | K
/// heads | V heads]`), O = softmax(Q K^T / sqrt(d)) V per (image, head) in one
/// launch reading Q, K and V straight from that projection, out = O Wo^T + bo.
/// The backward keeps the softmax statistics (log-sum-exp per query), not the
/// probabilities.
final class Attention {
    let qkv: Linear, proj: Linear
    let width: Int, heads: Int, headDim: Int
    let causal: Bool
    let ws: Workspace

    init(_ store: ParameterStore, _ name: String, width: Int, heads: Int, causal: Bool = false) throws {
        precondition(width % heads == 0, "width must divide into heads")
        self.width = width; self.heads = heads; headDim = width / heads; self.causal = causal
        qkv = try Linear(store, "\(name).qkv", in: width, out: 3 * width)
        proj = try Linear(store, "\(name).proj", in: width, out: width)
        ws = Workspace(backend: store.backend)
    }

    private func shape(batch: Int, tokens: Int) -> AttentionConfig {
        .packedQKV(batch: batch, queryHeads: heads, tokens: tokens, headDim: headDim, causal: causal)
    }

    /// x: [B*T, D] -> out: [B*T, D] (overwritten).
    func forward(_ x: Tensor, batch: Int, tokens: Int, into out: Tensor) throws {
        let b = x.backend, rows = batch * tokens, c = shape(batch: batch, tokens: tokens)
        let packed = try ws.get("qkv", [rows, 3 * width])
        try qkv.forward(x, rows: rows, into: packed)
        let (q, k, v) = try c.views(ofPacked: packed)
        let merged = try ws.get("merged", [rows, width]), lse = try ws.get("logSumExp", [batch, heads, tokens])
        try b.attention(c, q: q, k: k, v: v, out: merged, logSumExp: lse)
        try proj.forward(merged, rows: rows, into: out)
    }

    /// dOut: [B*T, D]; writes (overwrites) the input gradient into `dX`.
    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, dX: Tensor) throws {
        let b = dOut.backend, rows = batch * tokens, c = shape(batch: batch, tokens: tokens)
        let merged = try ws.get("merged", [rows, width]), dMerged = try ws.get("dMerged", [rows, width])
        try proj.backward(dY: dOut, x: merged, rows: rows, dX: dMerged)
        let packed = try ws.get("qkv", [rows, 3 * width]), dPacked = try ws.get("dqkv", [rows, 3 * width])
        let (q, k, v) = try c.views(ofPacked: packed)
        let (dq, dk, dv) = try c.views(ofPacked: dPacked)
        try b.attentionBackward(c, q: q, k: k, v: v, out: merged, logSumExp: try ws.get("logSumExp", [batch, heads, tokens]),
                                dOut: dMerged, dQ: dq, dK: dk, dV: dv)
        try qkv.backward(dY: dPacked, x: x, rows: rows, dX: dX, accumulateDX: false)
    }
}
