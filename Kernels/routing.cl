// Routing: top-k gating with seeded jitter, the load-balancing and z losses,
// expert choice (and top-C selection by weight for the "probs" drop policy),
// and the hyperspherical / Soft-MoE building blocks. T tokens, E experts,
// k choices per token. Every buffer argument is followed by its offset in
// elements. No float atomics: every sum runs in a fixed order, so results are
// bitwise reproducible run to run.

// Largest work-group the local arrays below are sized for (the host never launches more).
#define GROUP_MAX 256

// ---------------------------------------------------------------------------
// Work-group helpers (every work-item of the group must call them).

// Sum of one int per work-item, pairwise in a fixed tree; every work-item gets it.
inline int group_sum_int(__local int* buf, const int v)
{
    const int lid = get_local_id(0), G = get_local_size(0);
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = 1; s < G; s <<= 1) {
        if ((lid & (2 * s - 1)) == 0 && lid + s < G) buf[lid] += buf[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const int total = buf[0];
    barrier(CLK_LOCAL_MEM_FENCE);   // buf is reused by the next call
    return total;
}

// The same fixed tree for floats: deterministic for a given group size.
inline float group_sum_float(__local float* buf, const float v)
{
    const int lid = get_local_id(0), G = get_local_size(0);
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = 1; s < G; s <<= 1) {
        if ((lid & (2 * s - 1)) == 0 && lid + s < G) buf[lid] += buf[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = buf[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

// Exclusive prefix sum of one int per work-item (Hillis-Steele); *total gets the group sum.
inline int group_exclusive_scan(__local int* buf, const int v, int* total)
{
    const int lid = get_local_id(0), G = get_local_size(0);
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = 1; off < G; off <<= 1) {
        const int add = lid >= off ? buf[lid - off] : 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        buf[lid] += add;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const int inclusive = buf[lid];
    *total = buf[G - 1];
    barrier(CLK_LOCAL_MEM_FENCE);
    return inclusive - v;
}

// ---------------------------------------------------------------------------
// Jitter: a counter-based hash of (seed, token, expert), the same bits as
// GateJitter.factor in Swift. m = fma(eps, 2u - 1, 1), u uniform in [0, 1).

inline uint mix32(uint x)   // lowbias32
{
    x ^= x >> 16; x *= 0x7feb352du;
    x ^= x >> 15; x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

inline float jitter_factor(const uint seed, const int t, const int e, const float eps)
{
    const uint h = mix32(mix32(mix32(seed) + (uint)t) + (uint)e);
    const float u = (float)(h >> 8) * (1.0f / 16777216.0f);   // exact: 24 bits
    return fma(eps, 2.0f * u - 1.0f, 1.0f);
}

// ---------------------------------------------------------------------------
// Top-k gate, one work-item per token. probs doubles as scratch for the
// jittered logits until the last loop turns them into probabilities.
//   mode 0: softmax then top-k (renorm: divide the k probabilities by their sum)
//   mode 1: top-k on the logits, then softmax over the k
__kernel void gate_topk(__global const float* logits, const int offL,
                        const int T, const int E, const int K,
                        const int mode, const int renorm,
                        const int jitter, const uint seed, const float eps,
                        __global int* index, const int offI,
                        __global float* weight, const int offW,
                        __global float* probs, const int offP)
{
    const int t = get_global_id(0);
    if (t >= T) return;
    __global const float* l = logits + offL + t * E;
    __global float* z = probs + offP + t * E;          // jittered logits, then probs
    __global int* idx = index + offI + t * K;
    __global float* w = weight + offW + t * K;

    float m = -INFINITY;
    for (int e = 0; e < E; e++) {
        const float v = jitter ? l[e] * jitter_factor(seed, t, e, eps) : l[e];
        z[e] = v;
        m = fmax(m, v);
    }
    float s = 0.0f;
    for (int e = 0; e < E; e++) s += exp(z[e] - m);

    // Pass j takes the largest logit ordered after the previous pick (larger
    // value first, then lower index): top-k with ties to the lower index, no marks.
    int prev = -1;
    float wsum = 0.0f;
    for (int j = 0; j < K; j++) {
        int best = -1;
        float bv = 0.0f;
        const float pv = prev >= 0 ? z[prev] : 0.0f;
        for (int e = 0; e < E; e++) {
            const float v = z[e];
            if (prev >= 0 && !(v < pv || (v == pv && e > prev))) continue;
            if (best < 0 || v > bv) { best = e; bv = v; }
        }
        if (best < 0) best = 0;   // only with NaN logits
        idx[j] = best;
        // mode 0: the probability; mode 1: exp relative to the top logit (normalised below).
        const float wj = mode == 0 ? exp(z[best] - m) / s : exp(z[best] - z[idx[0]]);
        w[j] = wj;
        wsum += wj;
        prev = best;
    }
    if (mode == 1 || renorm)
        for (int j = 0; j < K; j++) w[j] = w[j] / wsum;
    for (int e = 0; e < E; e++) z[e] = exp(z[e] - m) / s;
}

// Gradient of the gate w.r.t. the logits, one work-item per token:
//   dp_e = dProbs_e + sum_{j: idx_j = e} g_j,  g_j = dw_j (or (dw_j - w.dw)/S when renormalised)
//   mode 1 adds  w_j (dw_j - w.dw)  directly to the chosen logits (softmax over k)
//   dLogits_e = (direct_e + p_e (dp_e - p.dp)) * jitter factor
__kernel void gate_backward(const int T, const int E, const int K,
                            const int mode, const int renorm,
                            const int jitter, const uint seed, const float eps,
                            __global const int* index, const int offI,
                            __global const float* weight, const int offW,
                            __global const float* probs, const int offP,
                            __global const float* dWeight, const int offDW,
                            __global const float* dProbs, const int offDP, const int hasDProbs,
                            __global float* dLogits, const int offDL)
{
    const int t = get_global_id(0);
    if (t >= T) return;
    __global const int* idx = index + offI + t * K;
    __global const float* w = weight + offW + t * K;
    __global const float* dw = dWeight + offDW + t * K;
    __global const float* p = probs + offP + t * E;
    __global const float* dP = dProbs + offDP + t * E;
    __global float* dl = dLogits + offDL + t * E;

    float wdw = 0.0f, S = 0.0f;
    for (int j = 0; j < K; j++) { wdw += w[j] * dw[j]; S += p[idx[j]]; }

    // p.dp, with dp the probability gradient before the softmax backward.
    float pdp = 0.0f;
    if (hasDProbs) for (int e = 0; e < E; e++) pdp += p[e] * dP[e];
    if (mode == 0)
        for (int j = 0; j < K; j++) pdp += p[idx[j]] * (renorm ? (dw[j] - wdw) / S : dw[j]);

    for (int e = 0; e < E; e++) {
        float dp = hasDProbs ? dP[e] : 0.0f, direct = 0.0f;
        for (int j = 0; j < K; j++) {
            if (idx[j] != e) continue;
            if (mode == 0) dp += renorm ? (dw[j] - wdw) / S : dw[j];
            else direct += w[j] * (dw[j] - wdw);
        }
        const float g = direct + p[e] * (dp - pdp);
        dl[e] = jitter ? g * jitter_factor(seed, t, e, eps) : g;
    }
}

// ---------------------------------------------------------------------------
// Softmax along rows (router probabilities; Soft-MoE combine over slots), one work-item per row.
__kernel void softmax_rows(__global const float* x, const int offX, __global float* y, const int offY,
                           const int R, const int C)
{
    const int r = get_global_id(0);
    if (r >= R) return;
    __global const float* a = x + offX + r * C;
    __global float* b = y + offY + r * C;
    float m = -INFINITY;
    for (int c = 0; c < C; c++) m = fmax(m, a[c]);
    float s = 0.0f;
    for (int c = 0; c < C; c++) s += exp(a[c] - m);
    for (int c = 0; c < C; c++) b[c] = exp(a[c] - m) / s;
}

// dx = y (dy - y.dy) per row. With a mask (expert choice), dy counts only where mask >= 0.
__kernel void softmax_rows_backward(__global const float* y, const int offY, __global const float* dy, const int offDY,
                                    __global const int* mask, const int offM, const int useMask,
                                    __global float* dx, const int offDX, const int R, const int C)
{
    const int r = get_global_id(0);
    if (r >= R) return;
    __global const float* a = y + offY + r * C;
    __global const float* da = dy + offDY + r * C;
    __global const int* mk = mask + offM + r * C;
    __global float* out = dx + offDX + r * C;
    float dot = 0.0f;
    for (int c = 0; c < C; c++) {
        const float g = (!useMask || mk[c] >= 0) ? da[c] : 0.0f;
        dot += a[c] * g;
    }
    for (int c = 0; c < C; c++) {
        const float g = (!useMask || mk[c] >= 0) ? da[c] : 0.0f;
        out[c] = a[c] * (g - dot);
    }
}

// Soft-MoE dispatch: softmax down each column of x [R, C] (over tokens), one
// work-item per column; neighbouring work-items read neighbouring addresses.
__kernel void softmax_cols(__global const float* x, const int offX, __global float* y, const int offY,
                           const int R, const int C)
{
    const int c = get_global_id(0);
    if (c >= C) return;
    __global const float* a = x + offX + c;
    __global float* b = y + offY + c;
    float m = -INFINITY;
    for (int r = 0; r < R; r++) m = fmax(m, a[r * C]);
    float s = 0.0f;
    for (int r = 0; r < R; r++) s += exp(a[r * C] - m);
    for (int r = 0; r < R; r++) b[r * C] = exp(a[r * C] - m) / s;
}

__kernel void softmax_cols_backward(__global const float* y, const int offY, __global const float* dy, const int offDY,
                                    __global float* dx, const int offDX, const int R, const int C)
{
    const int c = get_global_id(0);
    if (c >= C) return;
    __global const float* a = y + offY + c;
    __global const float* da = dy + offDY + c;
    __global float* out = dx + offDX + c;
    float dot = 0.0f;
    for (int r = 0; r < R; r++) dot += a[r * C] * da[r * C];
    for (int r = 0; r < R; r++) out[r * C] = a[r * C] * (da[r * C] - dot);
}

// ---------------------------------------------------------------------------
// Row L2 normalisation y = x / max(|x|, eps), one work-item per row.
__kernel void l2norm_rows(__global const float* x, const int offX, __global float* y, const int offY,
                          const int R, const int D, const float eps)
{
    const int r = get_global_id(0);
    if (r >= R) return;
    __global const float* a = x + offX + r * D;
    __global float* b = y + offY + r * D;
    float ss = 0.0f;
    for (int c = 0; c < D; c++) ss += a[c] * a[c];
    const float inv = 1.0f / fmax(sqrt(ss), eps);
    for (int c = 0; c < D; c++) b[c] = a[c] * inv;
}

// dx = (dy - x (x.dy)/|x|^2) / |x|, or dy / eps where the norm was clamped.
__kernel void l2norm_rows_backward(__global const float* x, const int offX, __global const float* dy, const int offDY,
                                   __global float* dx, const int offDX, const int R, const int D, const float eps)
{
    const int r = get_global_id(0);
    if (r >= R) return;
    __global const float* a = x + offX + r * D;
    __global const float* da = dy + offDY + r * D;
    __global float* out = dx + offDX + r * D;
    float ss = 0.0f, dot = 0.0f;
    for (int c = 0; c < D; c++) { ss += a[c] * a[c]; dot += a[c] * da[c]; }
    const float norm = sqrt(ss);
    if (norm <= eps) {
        for (int c = 0; c < D; c++) out[c] = da[c] / eps;
    } else {
        const float proj = dot / ss;
        for (int c = 0; c < D; c++) out[c] = (da[c] - a[c] * proj) / norm;
    }
}

// ---------------------------------------------------------------------------
// Temperature: logits = scores / tau, with tau read on the device.
__kernel void divide_by_scalar(__global const float* x, const int offX, __global const float* tau, const int offTau,
                               __global float* y, const int offY, const int n)
{
    const int i = get_global_id(0);
    if (i < n) y[offY + i] = x[offX + i] / tau[offTau];
}

// Deterministic sums, step 1: work-group g reduces [g*chunk, (g+1)*chunk) of
// a (times b when hasB) in a fixed order into partial[g].
__kernel void dot_partials(__global const float* a, const int offA, __global const float* b, const int offB,
                           const int hasB, const int n, const int chunk, __global float* partial, const int offPart)
{
    __local float buf[GROUP_MAX];
    const int g = get_group_id(0), lid = get_local_id(0), G = get_local_size(0);
    const int start = g * chunk, end = min(n, start + chunk);
    float s = 0.0f;
    for (int i = start + lid; i < end; i += G) s += hasB ? a[offA + i] * b[offB + i] : a[offA + i];
    const float total = group_sum_float(buf, s);
    if (lid == 0) partial[offPart + g] = total;
}

// Step 2, one work-group: out = scale * sum(partial), or, when tau is given
// (temperature gradient), out = -sum(partial) / tau.
__kernel void sum_final(__global const float* partial, const int offPart, const int n, const float scale,
                        __global const float* tau, const int offTau, const int useTau,
                        __global float* out, const int offOut)
{
    __local float buf[GROUP_MAX];
    const int lid = get_local_id(0), G = get_local_size(0);
    float s = 0.0f;
    for (int i = lid; i < n; i += G) s += partial[offPart + i];
    const float total = group_sum_float(buf, s);
    if (lid == 0) out[offOut] = useTau ? -total / tau[offTau] : scale * total;
}

// ---------------------------------------------------------------------------
// Router z-loss, one work-item per token: sq[t] = lse_t^2 (summed by
// dot_partials/sum_final), and dLogits = coef * 2 lse softmax / T (+= when accumulate).
__kernel void zloss_rows(__global const float* logits, const int offL, const int T, const int E,
                         __global float* sq, const int offSq,
                         const int hasGrad, const int accumulate, const float coef,
                         __global float* dLogits, const int offDL)
{
    const int t = get_global_id(0);
    if (t >= T) return;
    __global const float* l = logits + offL + t * E;
    float m = -INFINITY;
    for (int e = 0; e < E; e++) m = fmax(m, l[e]);
    float s = 0.0f;
    for (int e = 0; e < E; e++) s += exp(l[e] - m);
    const float lse = m + log(s);
    sq[offSq + t] = lse * lse;
    if (!hasGrad) return;
    const float g = coef * 2.0f * lse / (float)T;
    __global float* d = dLogits + offDL + t * E;
    for (int e = 0; e < E; e++) {
        const float v = g * exp(l[e] - lse);
        d[e] = accumulate ? d[e] + v : v;
    }
}

// Load-balancing loss, step 1: work-item (e, c) sums probs[t, e] and counts
// the choices of e over the tokens of chunk c (e fastest: coalesced reads).
__kernel void lb_partials(__global const float* probs, const int offP, __global const int* index, const int offI,
                          const int T, const int E, const int K, const int chunk,
                          __global float* psum, __global int* pcount)
{
    const int e = get_global_id(0), c = get_global_id(1);
    const int gid = c * E + e;
    const int start = c * chunk, end = min(T, start + chunk);
    if (e >= E || start >= T) return;
    float s = 0.0f;
    int n = 0;
    for (int t = start; t < end; t++) {
        s += probs[offP + t * E + e];
        for (int j = 0; j < K; j++) n += index[offI + t * K + j] == e;
    }
    psum[gid] = s;
    pcount[gid] = n;
}

// Step 2, one work-item: P_e, f_e in chunk order; loss = E sum_e f_e P_e and
// the per-expert gradient coef * E * f_e / T for lb_grad.
__kernel void lb_final(__global const float* psum, __global const int* pcount, const int chunks,
                       const int T, const int E, const int K, const float coef,
                       __global float* loss, const int offLoss, __global float* gradE)
{
    if (get_global_id(0) != 0) return;
    float aux = 0.0f;
    for (int e = 0; e < E; e++) {
        float P = 0.0f;
        int n = 0;
        for (int c = 0; c < chunks; c++) { P += psum[c * E + e]; n += pcount[c * E + e]; }
        const float f = (float)n / (float)(T * K);
        aux += f * (P / (float)T);
        gradE[e] = coef * (float)E * f / (float)T;
    }
    loss[offLoss] = (float)E * aux;
}

__kernel void lb_grad(__global const float* gradE, const int T, const int E, __global float* dProbs, const int offDP)
{
    const int i = get_global_id(0);
    if (i < T * E) dProbs[offDP + i] = gradE[i % E];
}

// ---------------------------------------------------------------------------
// Top-C selection, one work-group per expert e: keep the C members with the
// largest key, ties to the lower item index, and rank the kept ones in item order.
//   mode 0 (expert choice): items are tokens t < n, key probs[t*E + e]; writes
//          dest[t*E+e] = e*C + rank or -1, cw = prob or 0, src[e*C + rank] = t*E + e,
//          counts[e] = C, offsets[e] = e*C (and offsets[E]).
//   mode 1 (drop policy "probs"): items are assignments i < n with
//          expertOf[i] == e, key weight[i]; writes keep[i] = 0/1 for members.
// The C-th largest key tau is found by a radix select on order-preserving
// integer keys (4 passes of 8 bits: a 256-bin local histogram counted with
// 32-bit local atomics, exact), then one ordered pass with two scans keeps
// every key above tau plus the earliest ties and gives the ranks.

// Larger float -> larger uint.
inline uint order_key(const float v)
{
    const uint b = as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__kernel void select_top_c(const int mode, const int n, const int E, const int C,
                           __global const float* key, const int offKey,
                           __global const int* expertOf, const int offExp,
                           __global int* dest, const int offDest,
                           __global float* cw, const int offCW,
                           __global int* src, const int offSrc,
                           __global int* counts, const int offCounts,
                           __global int* offsets, const int offOffsets,
                           __global int* keep, const int offKeep)
{
    __local int buf[GROUP_MAX];
    const int e = get_group_id(0), lid = get_local_id(0), G = get_local_size(0);

    #define MEMBER(i) (mode == 0 || expertOf[offExp + (i)] == e)
    #define VALUE(i) (mode == 0 ? key[offKey + (i) * E + e] : key[offKey + (i)])

    // tau: the largest threshold with at least C members at or above it (the
    // C-th largest key), 8 bits at a time from the top: among the members that
    // match the digits chosen so far, walk the histogram down from digit 255
    // until the count reaches the number still needed.
    __local int hist[256];
    __local int pick[2];
    uint tau = 0, mask = 0;
    int need = C;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = lid; d < 256; d += G) hist[d] = 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = lid; i < n; i += G) {
            if (!MEMBER(i)) continue;
            const uint k = order_key(VALUE(i));
            if ((k & mask) == tau) atomic_inc(&hist[(k >> shift) & 255u]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid == 0) {
            int d = 255, above = 0;
            for (; d > 0; d--) {
                if (above + hist[d] >= need) break;
                above += hist[d];
            }
            pick[0] = d;
            pick[1] = need - above;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        tau |= (uint)pick[0] << shift;
        mask |= 255u << shift;
        need = pick[1];
        barrier(CLK_LOCAL_MEM_FENCE);   // pick is rewritten by the next pass
    }
    int above = 0;
    for (int i = lid; i < n; i += G) above += MEMBER(i) && order_key(VALUE(i)) > tau;
    const int needTies = C - group_sum_int(buf, above);   // members equal to tau still to keep

    int tiesBefore = 0, keptBefore = 0, total;
    for (int base = 0; base < n; base += G) {
        const int i = base + lid;
        const int in = i < n && MEMBER(i);
        const float v = in ? VALUE(i) : 0.0f;
        const uint k = in ? order_key(v) : 0u;
        const int tie = in && k == tau;
        const int tieRank = tiesBefore + group_exclusive_scan(buf, tie, &total);
        tiesBefore += total;
        const int kept = in && (k > tau || (tie && tieRank < needTies));
        const int rank = keptBefore + group_exclusive_scan(buf, kept, &total);
        keptBefore += total;
        if (mode == 0) {
            if (i < n) {
                dest[offDest + i * E + e] = kept ? e * C + rank : -1;
                cw[offCW + i * E + e] = kept ? v : 0.0f;
                if (kept) src[offSrc + e * C + rank] = i * E + e;
            }
        } else if (in) {
            keep[offKeep + i] = kept;
        }
    }
    if (mode == 0 && lid == 0) {
        counts[offCounts + e] = C;
        offsets[offOffsets + e] = e * C;
        if (e == E - 1) offsets[offOffsets + E] = E * C;
    }
    #undef MEMBER
    #undef VALUE
}
