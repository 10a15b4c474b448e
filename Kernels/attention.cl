// Fused (flash-style) multi-head attention, forward and backward.
//
// Layout (see AttentionConfig): element c of head h of token t of batch b is at
// off + b * bs + t * ld + h * d + c, for Q, K, V, O and their gradients (which
// share the layouts of Q, K, V, O). Every buffer argument is followed by its
// offset in elements. Query head h uses kv head h / group (grouped-query
// attention). With `causal`, query i (absolute position Tk - Tq + i) sees keys
// j <= Tk - Tq + i; a query that sees no key gets O = 0, L = -inf, dQ = 0.
//
// L_i (the saved log-sum-exp) = log(sum_j exp(scale * q_i . k_j)) over visible
// keys, so P_ij = exp(scale * q_i . k_j - L_i) is recomputed in the backward
// instead of storing P.
//
// One work-item per query row (forward, dQ) or key row (dK/dV), its row and its
// accumulators in private memory; the other operand streams through local
// memory in blocks shared by the work-group. Every sum runs in a fixed order:
// deterministic, no atomics (OpenCL C 1.2 has no float atomics).
//
// The backward is two kernels: dQ_i sums over keys and dK_j, dV_j sum over
// queries (and over the query heads of a kv group); one kernel over either axis
// would have to add partial sums of the other into global memory from several
// work-groups, i.e. float atomics or a non-deterministic order.

// Largest head dim (private rows and local tiles are sized by it).
#ifndef ATTN_D_MAX
#define ATTN_D_MAX 128
#endif
// Work-items per group (query rows in the forward and dQ kernels, key rows in
// the dK/dV kernel) are the host's local size (64 by default); the kernels read
// get_local_size, so any size works.
// Key rows per local tile in the forward and dQ kernels: K and V tiles take
// 2 * ATTN_BLOCK_K * ATTN_D_MAX floats (32 KB at the defaults).
#ifndef ATTN_BLOCK_K
#define ATTN_BLOCK_K 32
#endif
// Query rows per local tile in the dK/dV kernel: Q and dO tiles take
// 2 * ATTN_BLOCK_QT * ATTN_D_MAX floats (16 KB at the defaults) plus L and D.
#ifndef ATTN_BLOCK_QT
#define ATTN_BLOCK_QT 16
#endif

// Keys query i sees: 0 ..< visible_keys(i).
static int visible_keys(const int i, const int Tq, const int Tk, const int causal)
{
    if (!causal) return Tk;
    return clamp(Tk - Tq + i + 1, 0, Tk);
}

// Copies rows r0 ..< r0 + count (count <= rows_per_tile) of one head from
// global memory into a packed local tile of `d` floats per row; the work-group
// shares the copy. Rows past `count` are left as they are (never read).
static void load_tile(__local float* tile, __global const float* base, const int ld,
                      const int r0, const int count, const int d)
{
    const int n = count * d;
    for (int e = get_local_id(0); e < n; e += get_local_size(0)) {
        const int r = e / d, c = e - r * d;
        tile[e] = base[(r0 + r) * ld + c];
    }
}

// ---------------------------------------------------------------------------
// Forward. Grid: [ceil(Tq / BQ) * BQ, B * Hq], local [BQ, 1]. Work-item i of
// group (qb, bh) owns query row qb * BQ + i of head h = bh % Hq of batch
// b = bh / Hq. Online softmax over key tiles: per tile the scores go to a private
// array, the running max m moves once per tile (rescaling acc and l by
// exp(m_old - m_new)), and acc += exp(s - m) * v_j.
__kernel void attention_forward(__global const float* q, const int offQ,
                                __global const float* k, const int offK,
                                __global const float* v, const int offV,
                                __global float* o, const int offO,
                                __global float* lse, const int offL,
                                const int Hq, const int group, const int Tq, const int Tk, const int d,
                                const int causal, const float scale,
                                const int ldq, const int ldk, const int ldv, const int ldo,
                                const int bsQ, const int bsK, const int bsV, const int bsO)
{
    __local float Ks[ATTN_BLOCK_K * ATTN_D_MAX];
    __local float Vs[ATTN_BLOCK_K * ATTN_D_MAX];
    const int bh = get_group_id(1), b = bh / Hq, h = bh - b * Hq, g = h / group;
    const int q0 = get_group_id(0) * get_local_size(0);
    const int i = q0 + get_local_id(0);
    const int valid = i < Tq;
    const int n = valid ? visible_keys(i, Tq, Tk, causal) : 0;
    // Keys the group's last row sees: the tiles to walk.
    const int keyEnd = visible_keys(min(Tq, q0 + (int)get_local_size(0)) - 1, Tq, Tk, causal);

    __global const float* kb = k + offK + b * bsK + g * d;
    __global const float* vb = v + offV + b * bsV + g * d;

    float qr[ATTN_D_MAX], acc[ATTN_D_MAX];
    if (valid) {
        __global const float* qp = q + offQ + b * bsQ + i * ldq + h * d;
        for (int c = 0; c < d; ++c) { qr[c] = qp[c] * scale; acc[c] = 0.0f; }
    }
    float m = -INFINITY, l = 0.0f;

    for (int j0 = 0; j0 < keyEnd; j0 += ATTN_BLOCK_K) {
        const int count = min(ATTN_BLOCK_K, keyEnd - j0);
        barrier(CLK_LOCAL_MEM_FENCE);   // the previous tile is no longer read
        load_tile(Ks, kb, ldk, j0, count, d);
        load_tile(Vs, vb, ldv, j0, count, d);
        barrier(CLK_LOCAL_MEM_FENCE);
        const int mine = min(count, n - j0);   // keys of this tile row i sees
        if (mine > 0) {
            float s[ATTN_BLOCK_K];
            float tileMax = -INFINITY;
            for (int jj = 0; jj < mine; ++jj) {
                __local const float* kr = Ks + jj * d;
                float x = 0.0f;
                for (int c = 0; c < d; ++c) x = fma(qr[c], kr[c], x);
                s[jj] = x;
                tileMax = fmax(tileMax, x);
            }
            const float mNew = fmax(m, tileMax);
            const float correction = exp(m - mNew);   // 0 on the first tile (m = -inf)
            l *= correction;
            for (int c = 0; c < d; ++c) acc[c] *= correction;
            for (int jj = 0; jj < mine; ++jj) {
                const float p = exp(s[jj] - mNew);
                l += p;
                __local const float* vr = Vs + jj * d;
                for (int c = 0; c < d; ++c) acc[c] = fma(p, vr[c], acc[c]);
            }
            m = mNew;
        }
    }
    if (valid) {
        __global float* op = o + offO + b * bsO + i * ldo + h * d;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int c = 0; c < d; ++c) op[c] = acc[c] * inv;
        lse[offL + bh * Tq + i] = l > 0.0f ? m + log(l) : -INFINITY;
    }
}

// ---------------------------------------------------------------------------
// dQ. Grid and ownership as the forward. With D_i = dO_i . O_i:
//   P_ij = exp(scale q_i . k_j - L_i),  dS_ij = P_ij (dO_i . v_j - D_i),
//   dQ_i = scale * sum_j dS_ij k_j.
__kernel void attention_backward_dq(__global const float* q, const int offQ,
                                    __global const float* k, const int offK,
                                    __global const float* v, const int offV,
                                    __global const float* o, const int offO,
                                    __global const float* lse, const int offL,
                                    __global const float* dout, const int offDO,
                                    __global float* dq, const int offDQ,
                                    const int Hq, const int group, const int Tq, const int Tk, const int d,
                                    const int causal, const float scale,
                                    const int ldq, const int ldk, const int ldv, const int ldo,
                                    const int bsQ, const int bsK, const int bsV, const int bsO)
{
    __local float Ks[ATTN_BLOCK_K * ATTN_D_MAX];
    __local float Vs[ATTN_BLOCK_K * ATTN_D_MAX];
    const int bh = get_group_id(1), b = bh / Hq, h = bh - b * Hq, g = h / group;
    const int q0 = get_group_id(0) * get_local_size(0);
    const int i = q0 + get_local_id(0);
    const int valid = i < Tq;
    const int n = valid ? visible_keys(i, Tq, Tk, causal) : 0;
    const int keyEnd = visible_keys(min(Tq, q0 + (int)get_local_size(0)) - 1, Tq, Tk, causal);

    __global const float* kb = k + offK + b * bsK + g * d;
    __global const float* vb = v + offV + b * bsV + g * d;

    float qr[ATTN_D_MAX], dor[ATTN_D_MAX], acc[ATTN_D_MAX];
    float L = 0.0f, D = 0.0f;
    if (valid) {
        __global const float* qp = q + offQ + b * bsQ + i * ldq + h * d;
        __global const float* op = o + offO + b * bsO + i * ldo + h * d;
        __global const float* dop = dout + offDO + b * bsO + i * ldo + h * d;
        for (int c = 0; c < d; ++c) {
            qr[c] = qp[c] * scale;
            dor[c] = dop[c];
            D = fma(dor[c], op[c], D);
            acc[c] = 0.0f;
        }
        L = lse[offL + bh * Tq + i];
    }

    for (int j0 = 0; j0 < keyEnd; j0 += ATTN_BLOCK_K) {
        const int count = min(ATTN_BLOCK_K, keyEnd - j0);
        barrier(CLK_LOCAL_MEM_FENCE);
        load_tile(Ks, kb, ldk, j0, count, d);
        load_tile(Vs, vb, ldv, j0, count, d);
        barrier(CLK_LOCAL_MEM_FENCE);
        const int mine = min(count, n - j0);
        for (int jj = 0; jj < mine; ++jj) {
            __local const float* kr = Ks + jj * d;
            __local const float* vr = Vs + jj * d;
            float s = 0.0f, dp = 0.0f;
            for (int c = 0; c < d; ++c) { s = fma(qr[c], kr[c], s); dp = fma(dor[c], vr[c], dp); }
            const float ds = exp(s - L) * (dp - D);
            for (int c = 0; c < d; ++c) acc[c] = fma(ds, kr[c], acc[c]);
        }
    }
    if (valid) {
        __global float* dqp = dq + offDQ + b * bsQ + i * ldq + h * d;
        for (int c = 0; c < d; ++c) dqp[c] = acc[c] * scale;
    }
}

// ---------------------------------------------------------------------------
// dK, dV. Grid: [ceil(Tk / BKV) * BKV, B * Hkv], local [BKV, 1]. Work-item j of
// group (kb, bg) owns key row kb * BKV + j of kv head g = bg % Hkv of batch b;
// it loops over the query heads of the group and, per head, over tiles of the
// query rows that see any key of the block (Q, dO rows, L and D in local memory):
//   dV_j = sum_i P_ij dO_i,  dK_j = scale * sum_i dS_ij q_i.
// Keys no query sees get 0.
__kernel void attention_backward_dkv(__global const float* q, const int offQ,
                                     __global const float* k, const int offK,
                                     __global const float* v, const int offV,
                                     __global const float* o, const int offO,
                                     __global const float* lse, const int offL,
                                     __global const float* dout, const int offDO,
                                     __global float* dk, const int offDK,
                                     __global float* dv, const int offDV,
                                     const int Hq, const int Hkv, const int Tq, const int Tk, const int d,
                                     const int causal, const float scale,
                                     const int ldq, const int ldk, const int ldv, const int ldo,
                                     const int bsQ, const int bsK, const int bsV, const int bsO)
{
    __local float Qs[ATTN_BLOCK_QT * ATTN_D_MAX];
    __local float dOs[ATTN_BLOCK_QT * ATTN_D_MAX];
    __local float Ls[ATTN_BLOCK_QT];
    __local float Ds[ATTN_BLOCK_QT];
    const int bg = get_group_id(1), b = bg / Hkv, g = bg - b * Hkv;
    const int group = Hq / Hkv;
    const int k0 = get_group_id(0) * get_local_size(0);
    const int j = k0 + get_local_id(0);
    const int valid = j < Tk;
    const int lid = get_local_id(0);
    // Causal: query i sees key j when i >= j - (Tk - Tq). The first query that
    // sees key j, and the first that sees any key of the block (0 without the mask):
    const int firstSeer = causal ? j - (Tk - Tq) : 0;
    const int qStart = causal ? max(0, k0 - (Tk - Tq)) : 0;

    float kr[ATTN_D_MAX], vr[ATTN_D_MAX], dka[ATTN_D_MAX], dva[ATTN_D_MAX];
    if (valid) {
        __global const float* kp = k + offK + b * bsK + j * ldk + g * d;
        __global const float* vp = v + offV + b * bsV + j * ldv + g * d;
        for (int c = 0; c < d; ++c) { kr[c] = kp[c] * scale; vr[c] = vp[c]; dka[c] = 0.0f; dva[c] = 0.0f; }
    }

    for (int h = g * group; h < (g + 1) * group; ++h) {
        __global const float* qb = q + offQ + b * bsQ + h * d;
        __global const float* dob = dout + offDO + b * bsO + h * d;
        for (int i0 = qStart; i0 < Tq; i0 += ATTN_BLOCK_QT) {
            const int count = min(ATTN_BLOCK_QT, Tq - i0);
            barrier(CLK_LOCAL_MEM_FENCE);
            load_tile(Qs, qb, ldq, i0, count, d);
            load_tile(dOs, dob, ldo, i0, count, d);
            barrier(CLK_LOCAL_MEM_FENCE);
            // L and D of the tile's rows, one row per work-item.
            for (int r = lid; r < count; r += get_local_size(0)) {
                const int i = i0 + r;
                __global const float* op = o + offO + b * bsO + i * ldo + h * d;
                float D = 0.0f;
                for (int c = 0; c < d; ++c) D = fma(dOs[r * d + c], op[c], D);
                Ds[r] = D;
                Ls[r] = lse[offL + (b * Hq + h) * Tq + i];
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            if (valid) {
                for (int r = max(0, firstSeer - i0); r < count; ++r) {
                    __local const float* qrow = Qs + r * d;
                    __local const float* drow = dOs + r * d;
                    float s = 0.0f, dp = 0.0f;
                    for (int c = 0; c < d; ++c) { s = fma(kr[c], qrow[c], s); dp = fma(vr[c], drow[c], dp); }
                    const float p = exp(s - Ls[r]);
                    const float ds = p * (dp - Ds[r]);
                    for (int c = 0; c < d; ++c) { dva[c] = fma(p, drow[c], dva[c]); dka[c] = fma(ds, qrow[c], dka[c]); }
                }
            }
        }
    }
    if (valid) {
        __global float* dkp = dk + offDK + b * bsK + j * ldk + g * d;
        __global float* dvp = dv + offDV + b * bsV + j * ldv + g * d;
        for (int c = 0; c < d; ++c) { dkp[c] = dka[c] * scale; dvp[c] = dva[c]; }
    }
}
