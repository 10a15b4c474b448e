// Dispatch plan (a stable counting sort of assignments by expert), permute
// rows into expert-contiguous order, gather-form weighted combine, and their
// gradients. T tokens, E experts, S slots per token, N = T*S assignments;
// assignment i is token i/S, slot i%S. Every buffer argument is followed by
// its offset in elements. No atomics at all: counts come from comparisons in
// local memory, sums run in a fixed slot order, so results are bitwise
// reproducible. offsets[E] (rows in use) is read on the device, never by the host.

#define GROUP_MAX 256

// ---------------------------------------------------------------------------
// Plan, step 1: work-group c loads the expert ids of assignments
// [c*G, c*G + G) into local memory (-1 for out-of-range ids, and, under the
// "probs" drop policy, for assignments not kept), then counts each expert.
inline int plan_load_id(__global const int* idx, const int offIdx, __global const int* keep, const int offKeep,
                        const int useKeep, const int n, const int E, const int i)
{
    if (i >= n) return -1;
    const int e = idx[offIdx + i];
    if (e < 0 || e >= E) return -1;
    if (useKeep && !keep[offKeep + i]) return -1;
    return e;
}

__kernel void plan_chunk_counts(__global const int* idx, const int offIdx, __global const int* keep, const int offKeep,
                                const int useKeep, const int n, const int E, __global int* chunkCounts)
{
    __local int ids[GROUP_MAX];
    const int c = get_group_id(0), lid = get_local_id(0), G = get_local_size(0);
    ids[lid] = plan_load_id(idx, offIdx, keep, offKeep, useKeep, n, E, c * G + lid);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int e = lid; e < E; e += G) {
        int cnt = 0;
        for (int j = 0; j < G; j++) cnt += ids[j] == e;
        chunkCounts[c * E + e] = cnt;
    }
}

// Step 2, one work-group: per expert, exclusive scan down the chunks (in place:
// chunkCounts becomes each chunk's base position), kept = min(count, cap);
// then an exclusive scan over experts gives offsets[E+1].
__kernel void plan_offsets(__global int* chunkCounts, const int chunks, const int E, const int cap,
                           __global int* counts, const int offCounts, __global int* offsets, const int offOffsets)
{
    const int lid = get_local_id(0), G = get_local_size(0);
    for (int e = lid; e < E; e += G) {
        int running = 0;
        for (int c = 0; c < chunks; c++) {
            const int v = chunkCounts[c * E + e];
            chunkCounts[c * E + e] = running;
            running += v;
        }
        counts[offCounts + e] = min(running, cap);
    }
    barrier(CLK_GLOBAL_MEM_FENCE);   // counts written by the whole group, read by work-item 0
    if (lid == 0) {
        int o = 0;
        offsets[offOffsets] = 0;
        for (int e = 0; e < E; e++) { o += counts[offCounts + e]; offsets[offOffsets + e + 1] = o; }
    }
}

// Step 3, same chunks: rank = number of earlier assignments of the same expert
// in the chunk (local memory, after the barrier), position = chunk base + rank.
// Kept when position < cap: destination = offsets[e] + position and
// sourceOfRow[destination] = i. Stable: token order inside each expert.
__kernel void plan_scatter(__global const int* idx, const int offIdx, __global const int* keep, const int offKeep,
                           const int useKeep, const int n, const int E, const int cap,
                           __global const int* chunkBase, __global const int* offsets, const int offOffsets,
                           __global int* dest, const int offDest, __global int* src, const int offSrc)
{
    __local int ids[GROUP_MAX];
    const int c = get_group_id(0), lid = get_local_id(0), G = get_local_size(0);
    const int i = c * G + lid;
    const int e = plan_load_id(idx, offIdx, keep, offKeep, useKeep, n, E, i);
    ids[lid] = e;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (i >= n) return;
    int row = -1;
    if (e >= 0) {
        int rank = 0;
        for (int j = 0; j < lid; j++) rank += ids[j] == e;
        const int pos = chunkBase[c * E + e] + rank;
        if (pos < cap) {
            row = offsets[offOffsets + e] + pos;
            src[offSrc + row] = i;
        }
    }
    dest[offDest + i] = row;
}

// Step 4: rows past offsets[E] have no source.
__kernel void plan_tail(__global const int* offsets, const int offOffsets, const int E,
                        __global int* src, const int offSrc, const int R)
{
    const int r = get_global_id(0);
    if (r < R && r >= offsets[offOffsets + E]) src[offSrc + r] = -1;
}

// ---------------------------------------------------------------------------
// Row kernels. A work-group is (L, RB): RB rows, L work-items striding over a
// row in float4 steps (vload4/vstore4 need only float alignment), with a
// scalar tail when H is not a multiple of 4.

inline void copy_row(__global const float* in, __global float* out, const int H, const int lx, const int L)
{
    const int H4 = H / 4;
    for (int c = lx; c < H4; c += L) vstore4(vload4(c, in), c, out);
    for (int c = H4 * 4 + lx; c < H; c += L) out[c] = in[c];
}

inline void zero_row(__global float* out, const int H, const int lx, const int L)
{
    const int H4 = H / 4;
    for (int c = lx; c < H4; c += L) vstore4((float4)(0.0f), c, out);
    for (int c = H4 * 4 + lx; c < H; c += L) out[c] = 0.0f;
}

// xp[r] = x[src[r] / S] for r < offsets[E], zero for the rows after.
__kernel void permute_rows(__global const float* x, const int offX, __global const int* src, const int offSrc,
                           __global const int* offsets, const int offOffsets, const int E,
                           __global float* xp, const int offXp, const int R, const int H, const int S)
{
    const int r = get_global_id(1);
    if (r >= R) return;
    const int lx = get_local_id(0), L = get_local_size(0);
    __global float* out = xp + offXp + r * H;
    if (r < offsets[offOffsets + E]) copy_row(x + offX + (src[offSrc + r] / S) * H, out, H, lx, L);
    else zero_row(out, H, lx, L);
}

// out[t] = sum_j w[t,j] * rows[dest[t,j]] in slot order, skipping -1 (w = 1 when !useW).
// Serves the combine and, without weights, the permute backward.
__kernel void gather_rows(__global const float* rows, const int offRows, __global const int* dest, const int offDest,
                          __global const float* w, const int offW, const int useW,
                          __global float* out, const int offOut, const int T, const int H, const int S)
{
    const int t = get_global_id(1);
    if (t >= T) return;
    const int lx = get_local_id(0), L = get_local_size(0);
    __global const int* d = dest + offDest + t * S;
    __global float* o = out + offOut + t * H;
    const int H4 = H / 4;
    for (int c = lx; c < H4; c += L) {
        float4 acc = (float4)(0.0f);
        for (int j = 0; j < S; j++) {
            const int r = d[j];
            if (r < 0) continue;
            const float4 y = vload4(c, rows + offRows + r * H);
            acc = useW ? acc + w[offW + t * S + j] * y : acc + y;
        }
        vstore4(acc, c, o);
    }
    for (int c = H4 * 4 + lx; c < H; c += L) {
        float acc = 0.0f;
        for (int j = 0; j < S; j++) {
            const int r = d[j];
            if (r < 0) continue;
            const float y = rows[offRows + r * H + c];
            acc = useW ? acc + w[offW + t * S + j] * y : acc + y;
        }
        o[c] = acc;
    }
}

// Combine backward, rows: dYp[r] = w[i] * dOut[i / S] for i = src[r], r < offsets[E]; zero after.
__kernel void combine_backward_rows(__global const float* dOut, const int offDOut, __global const int* src, const int offSrc,
                                    __global const float* w, const int offW,
                                    __global const int* offsets, const int offOffsets, const int E,
                                    __global float* dYp, const int offDYp, const int R, const int H, const int S)
{
    const int r = get_global_id(1);
    if (r >= R) return;
    const int lx = get_local_id(0), L = get_local_size(0);
    __global float* out = dYp + offDYp + r * H;
    if (r >= offsets[offOffsets + E]) { zero_row(out, H, lx, L); return; }
    const int i = src[offSrc + r];
    const float wi = w[offW + i];
    __global const float* g = dOut + offDOut + (i / S) * H;
    const int H4 = H / 4;
    for (int c = lx; c < H4; c += L) vstore4(wi * vload4(c, g), c, out);
    for (int c = H4 * 4 + lx; c < H; c += L) out[c] = wi * g[c];
}

// Combine backward, weights: dW[i] = dot(dOut[i / S], yp[dest[i]]), 0 when dropped.
// One work-item per assignment, float4 partial sums in a fixed order.
__kernel void combine_backward_weights(__global const float* dOut, const int offDOut, __global const float* yp, const int offYp,
                                       __global const int* dest, const int offDest,
                                       __global float* dW, const int offDW, const int N, const int H, const int S)
{
    const int i = get_global_id(0);
    if (i >= N) return;
    const int r = dest[offDest + i];
    if (r < 0) { dW[offDW + i] = 0.0f; return; }
    __global const float* g = dOut + offDOut + (i / S) * H;
    __global const float* y = yp + offYp + r * H;
    const int H4 = H / 4;
    float4 acc = (float4)(0.0f);
    for (int c = 0; c < H4; c++) acc += vload4(c, g) * vload4(c, y);
    float s = (acc.x + acc.y) + (acc.z + acc.w);
    for (int c = H4 * 4; c < H; c++) s += g[c] * y[c];
    dW[offDW + i] = s;
}
