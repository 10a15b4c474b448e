import MoECompute

/// Multi-head self-attention over `[B, T, D]`, through batched GEMMs:
/// qkv = x Wqkv^T + b -> split heads -> S = Q K^T / sqrt(d) -> P = softmax(S)
/// -> O = P V -> merge heads -> out = O Wo^T + bo.
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

    private var scale: Float { 1 / Float(headDim).squareRoot() }

    /// x: [B*T, D] -> out: [B*T, D] (overwritten).
    func forward(_ x: Tensor, batch: Int, tokens: Int, into out: Tensor) throws {
        let b = x.backend, rows = batch * tokens, bh = batch * heads, (t, d) = (tokens, headDim)
        let packed = try ws.get("qkv", [rows, 3 * width])
        try qkv.forward(x, rows: rows, into: packed)
        // [B, T, 3, H, d] -> [3, B, H, T, d]: Q, K, V each contiguous [B*H, T, d].
        let split = try ws.get("split", [3, batch, heads, t, d])
        try b.transposeAxes(try packed.reshaped([batch, t, 3, heads, d]), permutation: [2, 0, 3, 1, 4], out: split)
        let q = try split.view(offset: 0, shape: [bh, t, d])
        let k = try split.view(offset: bh * t * d, shape: [bh, t, d])
        let v = try split.view(offset: 2 * bh * t * d, shape: [bh, t, d])
        let probs = try ws.get("probs", [bh, t, t])
        try b.gemm(Gemm(m: t, n: t, k: d, transB: true, batch: bh), q, k, probs)
        try b.softmax(probs, out: probs, scale: scale, causal: causal)
        let heads_ = try ws.get("heads", [batch, heads, t, d])
        try b.gemm(Gemm(m: t, n: d, k: t, batch: bh), probs, v, heads_)
        let merged = try ws.get("merged", [batch, t, heads, d])
        try b.transposeAxes(heads_, permutation: [0, 2, 1, 3], out: merged)
        try proj.forward(merged, rows: rows, into: out)
    }

    /// dOut: [B*T, D]; adds dX into `dX` (the residual stream's gradient).
    func backward(dOut: Tensor, x: Tensor, batch: Int, tokens: Int, dX: Tensor) throws {
        let b = dOut.backend, rows = batch * tokens, bh = batch * heads, (t, d) = (tokens, headDim)
        let merged = try ws.get("merged", [batch, t, heads, d])
        let dMerged = try ws.get("dMerged", [batch, t, heads, d])
        try proj.backward(dY: dOut, x: merged, rows: rows, dX: dMerged)
        let dHeads = try ws.get("dHeads", [batch, heads, t, d])
        try b.transposeAxes(dMerged, permutation: [0, 2, 1, 3], out: dHeads)

        let split = try ws.get("split", [3, batch, heads, t, d])
        let q = try split.view(offset: 0, shape: [bh, t, d])
        let k = try split.view(offset: bh * t * d, shape: [bh, t, d])
        let v = try split.view(offset: 2 * bh * t * d, shape: [bh, t, d])
        let probs = try ws.get("probs", [bh, t, t])
        let dSplit = try ws.get("dSplit", [3, batch, heads, t, d])
        let dq = try dSplit.view(offset: 0, shape: [bh, t, d])
        let dk = try dSplit.view(offset: bh * t * d, shape: [bh, t, d])
        let dv = try dSplit.view(offset: 2 * bh * t * d, shape: [bh, t, d])
        // dV = P^T dO ; dP = dO V^T ; dS = softmax'(dP) ; dQ = dS K ; dK = dS^T Q
        try b.gemm(Gemm(m: t, n: d, k: t, transA: true, batch: bh), probs, dHeads, dv)
        let dProbs = try ws.get("dProbs", [bh, t, t])
        try b.gemm(Gemm(m: t, n: t, k: d, transB: true, batch: bh), dHeads, v, dProbs)
        try b.softmaxBackward(dY: dProbs, y: probs, dX: dProbs, scale: scale, accumulate: false)
        try b.gemm(Gemm(m: t, n: d, k: t, batch: bh), dProbs, k, dq)
        try b.gemm(Gemm(m: t, n: d, k: t, transA: true, batch: bh), dProbs, q, dk)
        let dPacked = try ws.get("dqkv", [batch, t, 3, heads, d])
        try b.transposeAxes(dSplit, permutation: [1, 3, 0, 2, 4], out: dPacked)
        try qkv.backward(dY: dPacked, x: x, rows: rows, dX: dX, accumulateDX: true)
    }
}
