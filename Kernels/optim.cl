// Optimiser kernels: AdamW, global gradient norm, clipping. Every buffer
// argument is followed by its offset in elements. Deterministic: the norm is
// per-work-group partial sums (fixed tree) then one work-group summing the
// partials in a fixed order; no float atomics.

#define MAX_GROUP 256

// Sum of one value per work-item over the work-group (power-of-two local size).
static float group_sum(float v, __local float* red)
{
    const int lid = get_local_id(0);
    red[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = get_local_size(0) / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] += red[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

// One AdamW step (decoupled weight decay), element-wise:
//   p -= lr * wd * p
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
//   p -= lr * (m * c1) / (sqrt(v * c2) + eps),  c1 = 1/(1 - b1^t), c2 = 1/(1 - b2^t)
__kernel void adamw(__global float* p, const int offP, __global const float* g, const int offG,
                    __global float* m, const int offM, __global float* v, const int offV, const int n,
                    const float lr, const float b1, const float b2, const float eps, const float wd,
                    const float c1, const float c2, const int decayed,
                    __global const float* guardNorm, const int offGuard, const int hasGuard)
{
    const int i = get_global_id(0);
    if (i >= n) return;
    // A non-finite gradient norm skips the whole step (the host sees it in the
    // step's metrics and stops), so parameters and moments stay the last good ones.
    if (hasGuard && !isfinite(guardNorm[offGuard])) return;
    const float gi = g[offG + i];
    const float mi = b1 * m[offM + i] + (1.0f - b1) * gi;
    const float vi = b2 * v[offV + i] + (1.0f - b2) * gi * gi;
    m[offM + i] = mi;
    v[offV + i] = vi;
    float pi = p[offP + i];
    if (i < decayed) pi -= lr * wd * pi;
    p[offP + i] = pi - lr * (mi * c1) / (sqrt(vi * c2) + eps);
}

// Pass 1 of the norm: work-group k of G sums x^2 over its contiguous block
// [k*B, (k+1)*B), B = ceil(n/G), its items striding by the local size over
// quads (coalesced on GPUs, a sequential stream with one item per group on
// CPUs), and writes partial[offPart + k].
__kernel void sumsq_partials(__global const float* x, const int offX, const int n,
                             __global float* partial, const int offPart)
{
    __local float red[MAX_GROUP];
    const int groups = get_num_groups(0), k = get_group_id(0), lid = get_local_id(0), step = get_local_size(0);
    const int block = (n + groups - 1) / groups;
    const int start = min(n, k * block), len = min(n, (k + 1) * block) - start;
    __global const float* xb = x + offX + start;
    // Quads of four (vload4, four partial sums), then the tail; fixed order.
    const int quads = len / 4;
    float4 s4 = 0.0f;
    for (int q = lid; q < quads; q += step) { const float4 v = vload4(q, xb); s4 += v * v; }
    float s = (s4.x + s4.y) + (s4.z + s4.w);
    for (int i = 4 * quads + lid; i < len; i += step) s += xb[i] * xb[i];
    s = group_sum(s, red);
    if (get_local_id(0) == 0) partial[offPart + k] = s;
}

// Pass 2: norm[0] = sqrt(sum of the partials), one work-group.
__kernel void norm_finalize(__global const float* partial, const int count, __global float* norm, const int offNorm)
{
    __local float red[MAX_GROUP];
    float s = 0.0f;
    for (int i = get_local_id(0); i < count; i += get_local_size(0)) s += partial[i];
    s = group_sum(s, red);
    if (get_local_id(0) == 0) norm[offNorm] = sqrt(s);
}

// x *= min(1, maxNorm / norm); unchanged for a zero or non-finite norm. The factor
// is read on the device so clipping needs no host round trip.
__kernel void clip_by_norm(__global float* x, const int offX, const int n,
                           __global const float* norm, const int offNorm, const float maxNorm)
{
    const int i = get_global_id(0);
    if (i >= n) return;
    const float nv = norm[offNorm];
    const float factor = (isfinite(nv) && nv > 0.0f) ? fmin(1.0f, maxNorm / nv) : 1.0f;
    x[offX + i] *= factor;
}
