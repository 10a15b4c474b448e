import Foundation

/// `AttentionOps` as the kernels of Kernels/attention.cl: one forward kernel and
/// two backward kernels (dQ per query block, dK/dV per key block; see the file
/// for why two).
extension OpenCLBackend: AttentionOps {
    /// The -D defines for a head dim: none up to the file's default ATTN_D_MAX
    /// (128) when the device's local memory holds the default tiles; otherwise a
    /// larger ATTN_D_MAX and tiles shrunk to fit.
    func attentionDefines(headDim d: Int) -> String {
        let dMax = d <= 128 ? 128 : (d + 31) / 32 * 32
        // Bytes of local memory each kernel may use (leave a little for the runtime).
        let budget = max(4096, min(Int(device.localMemoryBytes), 65536) - 1024)
        var blockK = 32, blockQT = 16
        while blockK > 1 && 2 * blockK * dMax * 4 > budget { blockK /= 2 }
        while blockQT > 1 && (2 * blockQT * dMax + 2 * blockQT) * 4 > budget { blockQT /= 2 }
        if dMax == 128 && blockK == 32 && blockQT == 16 { return "" }
        return "-DATTN_D_MAX=\(dMax) -DATTN_BLOCK_K=\(blockK) -DATTN_BLOCK_QT=\(blockQT)"
    }

    /// Work-items per group (one per query or key row): 64, or the device's limit.
    private var attentionGroup: Int { max(1, min(64, tuning.elementwiseGroup)) }

    private func attentionLayout(_ c: AttentionConfig) -> [CLArg] {
        [c.ldq, c.ldk, c.ldv, c.ldo, c.batchStrideQ, c.batchStrideK, c.batchStrideV, c.batchStrideO].map { .int(Int32($0)) }
    }

    public func attention(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor) throws {
        try AttentionCheck.forward(c, q: q, k: k, v: v, out: out, logSumExp: logSumExp)
        guard c.batch > 0, c.queryLength > 0 else { return }
        let group = attentionGroup
        let args: [CLArg] = try arg(q) + arg(k) + arg(v) + arg(out) + arg(logSumExp)
            + [c.queryHeads, c.group, c.queryLength, c.keyLength, c.headDim, c.causal ? 1 : 0].map { .int(Int32($0)) }
            + [.float(c.scale)] + attentionLayout(c)
        try kernel("attention_forward", in: "attention.cl", defines: attentionDefines(headDim: c.headDim)).launch(
            args, global: [(c.queryLength + group - 1) / group * group, c.batch * c.queryHeads], local: [group, 1])
    }

    public func attentionBackward(_ c: AttentionConfig, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logSumExp: Tensor,
                                  dOut: Tensor, dQ: Tensor, dK: Tensor, dV: Tensor) throws {
        try AttentionCheck.backward(c, q: q, k: k, v: v, out: out, logSumExp: logSumExp, dOut: dOut, dQ: dQ, dK: dK, dV: dV)
        guard c.batch > 0 else { return }
        let group = attentionGroup, defines = attentionDefines(headDim: c.headDim)
        let inputs: [CLArg] = try arg(q) + arg(k) + arg(v) + arg(out) + arg(logSumExp) + arg(dOut)
        let tail: [CLArg] = [c.queryLength, c.keyLength, c.headDim, c.causal ? 1 : 0].map { .int(Int32($0)) }
            + [.float(c.scale)] + attentionLayout(c)
        if c.queryLength > 0 {
            try kernel("attention_backward_dq", in: "attention.cl", defines: defines).launch(
                inputs + arg(dQ) + [.int(Int32(c.queryHeads)), .int(Int32(c.group))] + tail,
                global: [(c.queryLength + group - 1) / group * group, c.batch * c.queryHeads], local: [group, 1])
        }
        if c.keyLength > 0 {
            // Also with Tq == 0: dK and dV are overwritten with zeros.
            try kernel("attention_backward_dkv", in: "attention.cl", defines: defines).launch(
                inputs + arg(dK) + arg(dV) + [.int(Int32(c.queryHeads)), .int(Int32(c.kvHeads))] + tail,
                global: [(c.keyLength + group - 1) / group * group, c.batch * c.kvHeads], local: [group, 1])
        }
    }
}
