// Neural-network ops for the transformer around the experts: LayerNorm/RMSNorm,
// activations, SwiGLU, softmax, layout permutes, cross-entropy, token embedding, dropout, pooling.
//
// Conventions: every buffer argument is followed by its offset in elements;
// "rows x f" means rows of f features, row-major. Row kernels (norms, softmax,
// cross-entropy) run one work-group per row; the local size is a power of two
// <= 256 chosen by the host (1 on CPU devices, where a work-item looping over
// a contiguous row beats a group of items and barriers). Reductions use a
// fixed tree in local memory and
// reductions over rows use fixed chunks then a fixed-order second pass, so
// results depend only on the shapes: deterministic, no float atomics.
// `accumulate` (0 or 1) selects out += value over out = value.

#define MAX_GROUP 256
#define ROW_CHUNK 64   // rows summed per work-item in column reductions (pass 1)

// Sum of one value per work-item over the work-group; every item gets the total.
// Callers pass a __local buffer of MAX_GROUP floats; local size is a power of two.
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
    barrier(CLK_LOCAL_MEM_FENCE);   // red is reused by the next reduction
    return total;
}

// Maximum over the work-group, like group_sum.
static float group_max(float v, __local float* red)
{
    const int lid = get_local_id(0);
    red[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = get_local_size(0) / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] = fmax(red[lid], red[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

// Inclusive prefix sum of one int per work-item over the work-group
// (Hillis-Steele in local memory); *total gets the group's sum. Callers pass a
// __local buffer of MAX_GROUP ints; local size is a power of two.
static int group_scan(int v, __local int* buf, int* total)
{
    const int lid = get_local_id(0), g = get_local_size(0);
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = 1; off < g; off <<= 1) {
        const int add = lid >= off ? buf[lid - off] : 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        buf[lid] += add;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const int mine = buf[lid];
    *total = buf[g - 1];
    barrier(CLK_LOCAL_MEM_FENCE);   // buf is reused by the next scan
    return mine;
}

// Row kernels walk a row four consecutive features at a time (vload4: any
// float alignment): item lid takes quads q = lid, lid + step, ... and then the
// tail elements 4*quads + lid, + step, ... Every pass of a kernel uses this
// same split, so each element is read and written by one work-item only (no
// cross-item global memory hazards, in-place use is safe). Four partial sums
// per item keep a CPU device's adds pipelined and give GPUs 16-byte loads; the
// final (x + y) + (z + w) order is fixed, so results stay deterministic.
static float hsum(const float4 v) { return (v.x + v.y) + (v.z + v.w); }

static void store4(__global float* out, const int q, const float4 v, const int accumulate)
{
    const float4 old = vload4(q, out);
    vstore4(accumulate ? old + v : v, q, out);
}

static void store(__global float* out, const size_t i, const float v, const int accumulate)
{
    // The old value is loaded unconditionally (a branch-free body that PoCL
    // vectorises, 7x faster for GELU backward) but only used when accumulating:
    // a select, so NaN in an uninitialised output cannot leak in.
    const float old = out[i];
    out[i] = accumulate ? old + v : v;
}

// ---------------------------------------------------------------------------
// LayerNorm (centered = 1) and RMSNorm (centered = 0), one work-group per row.
//   LayerNorm: y = (x - mean) * rstd * gamma + beta,  rstd = 1/sqrt(var + eps)
//   RMSNorm:   y = x * rstd * gamma,                   rstd = 1/sqrt(mean(x^2) + eps)
// The variance is a second pass over (x - mean)^2, not E[x^2] - mean^2, which
// would cancel catastrophically for rows with a large mean.
__kernel void norm_forward(__global const float* x, const int offX,
                           __global const float* gamma, const int offG,
                           __global const float* beta, const int offB,
                           __global float* y, const int offY,
                           __global float* mean, const int offM,
                           __global float* rstd, const int offR,
                           const int f, const float eps, const int centered)
{
    __local float red[MAX_GROUP];
    const int row = get_group_id(0), lid = get_local_id(0), step = get_local_size(0);
    __global const float* xr = x + offX + (size_t)row * f;
    __global float* yr = y + offY + (size_t)row * f;

    const int quads = f / 4;
    float mu = 0.0f;
    if (centered) {
        float4 s4 = 0.0f;
        for (int q = lid; q < quads; q += step) s4 += vload4(q, xr);
        float s = hsum(s4);
        for (int j = 4 * quads + lid; j < f; j += step) s += xr[j];
        mu = group_sum(s, red) / f;
    }
    float4 ss4 = 0.0f;
    for (int q = lid; q < quads; q += step) { const float4 d = vload4(q, xr) - mu; ss4 += d * d; }
    float ss = hsum(ss4);
    for (int j = 4 * quads + lid; j < f; j += step) { const float d = xr[j] - mu; ss += d * d; }
    const float rs = rsqrt(group_sum(ss, red) / f + eps);

    __global const float* gr = gamma + offG;
    __global const float* br = beta + offB;
    for (int q = lid; q < quads; q += step) {
        const float4 v = (vload4(q, xr) - mu) * rs * vload4(q, gr);
        vstore4(centered ? v + vload4(q, br) : v, q, yr);
    }
    for (int j = 4 * quads + lid; j < f; j += step) {
        const float v = (xr[j] - mu) * rs * gr[j];
        yr[j] = centered ? v + br[j] : v;
    }
    if (lid == 0) {
        if (centered) mean[offM + row] = mu;
        rstd[offR + row] = rs;
    }
}

// dX of either norm, one work-group per row. With g = dY * gamma and
// xhat = (x - mean) * rstd:
//   LayerNorm: dX = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dX = rstd * (g - xhat * mean(g * xhat))        (mean = 0)
__kernel void norm_backward_dx(__global const float* dy, const int offDY,
                               __global const float* x, const int offX,
                               __global const float* gamma, const int offG,
                               __global const float* mean, const int offM,
                               __global const float* rstd, const int offR,
                               __global float* dx, const int offDX,
                               const int f, const int centered, const int accumulate)
{
    __local float red[MAX_GROUP];
    const int row = get_group_id(0), lid = get_local_id(0), step = get_local_size(0);
    const size_t base = (size_t)row * f;
    const float mu = centered ? mean[offM + row] : 0.0f;
    const float rs = rstd[offR + row];

    __global const float* dyr = dy + offDY + base;
    __global const float* xr = x + offX + base;
    __global const float* gr = gamma + offG;
    const int quads = f / 4;
    float4 sg4 = 0.0f, sgx4 = 0.0f;
    for (int q = lid; q < quads; q += step) {
        const float4 g = vload4(q, dyr) * vload4(q, gr);
        sg4 += g;
        sgx4 += g * (vload4(q, xr) - mu);
    }
    float sg = hsum(sg4), sgx = hsum(sgx4);
    for (int j = 4 * quads + lid; j < f; j += step) {
        const float g = dyr[j] * gr[j];
        sg += g;
        sgx += g * (xr[j] - mu);
    }
    const float meanG = centered ? group_sum(sg, red) / f : 0.0f;
    const float meanGX = group_sum(sgx, red) * rs / f;   // mean(g * xhat), xhat = (x - mean) * rstd

    __global float* dxr = dx + offDX + base;
    for (int q = lid; q < quads; q += step) {
        const float4 xhat = (vload4(q, xr) - mu) * rs;
        store4(dxr, q, rs * (vload4(q, dyr) * vload4(q, gr) - meanG - xhat * meanGX), accumulate);
    }
    for (int j = 4 * quads + lid; j < f; j += step) {
        const float xhat = (xr[j] - mu) * rs;
        store(dxr, j, rs * (dyr[j] * gr[j] - meanG - xhat * meanGX), accumulate);
    }
}

// Pass 1 of dGamma = sum_r dY * xhat and dBeta = sum_r dY: work-item (j, c) sums
// column j over rows [c*ROW_CHUNK, (c+1)*ROW_CHUNK) into partials [chunks, f].
// Adjacent work-items read adjacent columns (coalesced).
__kernel void norm_param_partials(__global const float* dy, const int offDY,
                                  __global const float* x, const int offX,
                                  __global const float* mean, const int offM,
                                  __global const float* rstd, const int offR,
                                  __global float* partG, __global float* partB,
                                  const int rows, const int f, const int centered)
{
    const int j = get_global_id(0), c = get_global_id(1);
    if (j >= f) return;
    const int r1 = min(rows, (c + 1) * ROW_CHUNK);
    float sg = 0.0f, sb = 0.0f;
    for (int r = c * ROW_CHUNK; r < r1; r++) {
        const size_t i = (size_t)r * f + j;
        const float mu = centered ? mean[offM + r] : 0.0f;
        const float d = dy[offDY + i];
        sg += d * (x[offX + i] - mu) * rstd[offR + r];
        sb += d;
    }
    partG[(size_t)c * f + j] = sg;
    if (centered) partB[(size_t)c * f + j] = sb;
}

// Pass 1 of column sums out[j] = sum_r x[r, j], like norm_param_partials.
__kernel void sum_rows_partials(__global const float* x, const int offX, __global float* part,
                                const int rows, const int cols)
{
    const int j = get_global_id(0), c = get_global_id(1);
    if (j >= cols) return;
    const int r1 = min(rows, (c + 1) * ROW_CHUNK);
    float s = 0.0f;
    for (int r = c * ROW_CHUNK; r < r1; r++) s += x[offX + (size_t)r * cols + j];
    part[(size_t)c * cols + j] = s;
}

// The same two pass-1 sums for CPU devices: one work-item per chunk walks its
// rows in order and adds each row into its partial row part[c, :], so reads
// are sequential. Every column is still summed over the chunk in row order:
// the partials are the same numbers as the column-per-item kernels give.
__kernel void norm_param_partials_rowwise(__global const float* dy, const int offDY,
                                          __global const float* x, const int offX,
                                          __global const float* mean, const int offM,
                                          __global const float* rstd, const int offR,
                                          __global float* partG, __global float* partB,
                                          const int rows, const int f, const int centered)
{
    const int c = get_global_id(0);
    if (c * ROW_CHUNK >= max(rows, 1)) return;
    __global float* pg = partG + (size_t)c * f;
    __global float* pb = partB + (size_t)c * f;
    for (int j = 0; j < f; j++) pg[j] = 0.0f;
    if (centered) for (int j = 0; j < f; j++) pb[j] = 0.0f;
    const int r1 = min(rows, (c + 1) * ROW_CHUNK);
    for (int r = c * ROW_CHUNK; r < r1; r++) {
        __global const float* dyr = dy + offDY + (size_t)r * f;
        __global const float* xr = x + offX + (size_t)r * f;
        const float mu = centered ? mean[offM + r] : 0.0f, rs = rstd[offR + r];
        for (int j = 0; j < f; j++) pg[j] += dyr[j] * (xr[j] - mu) * rs;
        if (centered) for (int j = 0; j < f; j++) pb[j] += dyr[j];
    }
}

__kernel void sum_rows_partials_rowwise(__global const float* x, const int offX, __global float* part,
                                        const int rows, const int cols)
{
    const int c = get_global_id(0);
    if (c * ROW_CHUNK >= max(rows, 1)) return;
    __global float* p = part + (size_t)c * cols;
    for (int j = 0; j < cols; j++) p[j] = 0.0f;
    const int r1 = min(rows, (c + 1) * ROW_CHUNK);
    for (int r = c * ROW_CHUNK; r < r1; r++) {
        __global const float* xr = x + offX + (size_t)r * cols;
        for (int j = 0; j < cols; j++) p[j] += xr[j];
    }
}

// Pass 2: out[j] (+)= sum over chunks in order of part[c, j].
__kernel void sum_partials_finalize(__global const float* part, const int chunks, const int cols,
                                    __global float* out, const int offOut, const int accumulate)
{
    const int j = get_global_id(0);
    if (j >= cols) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; c++) s += part[(size_t)c * cols + j];
    store(out, offOut + j, s, accumulate);
}

// y[i] += b[i mod period]: bias add (period = H) or positional embedding (period = T*H).
__kernel void add_broadcast(__global const float* b, const int offB, __global float* y, const int offY,
                            const int n, const int period)
{
    const int i = get_global_id(0);
    if (i < n) y[offY + i] += b[offB + i % period];
}

// ---------------------------------------------------------------------------
// Activations. kind: 0 = GELU (erf), 1 = GELU (tanh approximation), 2 = SiLU.

#define SQRT1_2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f
#define GELU_K 0.79788456080286536f     // sqrt(2/pi)
#define GELU_C 0.044715f

static float sigmoid(const float x) { return 1.0f / (1.0f + exp(-x)); }

// erf by the odd/even rational of XLA's and Eigen's float erf on [-3.9, 3.9],
// exactly +-1 beyond, NaN kept (|error| < 4e-7): the CPU backend's formula, and
// several times faster than PoCL's erf builtin.
static float erf_rational(const float a)
{
    const float x2 = a * a;
    float p = -2.72614225801306e-10f;
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 + -2.10102402082508e-06f;
    p = p * x2 + -5.69250639462346e-05f;
    p = p * x2 + -7.34990630326855e-04f;
    p = p * x2 + -2.95459980854025e-03f;
    p = p * x2 + -1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * x2 + -2.13374055278905e-04f;
    q = q * x2 + -1.68282697438203e-03f;
    q = q * x2 + -7.37332916720468e-03f;
    q = q * x2 + -1.42647390514189e-02f;
    const float y = (p * a) / q;
    return a > 3.9f ? 1.0f : (a < -3.9f ? -1.0f : y);
}

// tanh through one exp: exact limits +-1, a few ulp absolute error, and ~1.4x
// faster than the tanh builtin on PoCL (vectorised exp).
static float tanh_via_exp(const float u) { return 1.0f - 2.0f / (1.0f + exp(2.0f * u)); }

static float act(const float x, const int kind)
{
    if (kind == 0) return 0.5f * x * (1.0f + erf_rational(x * SQRT1_2));
    if (kind == 1) return 0.5f * x * (1.0f + tanh_via_exp(GELU_K * (x + GELU_C * x * x * x)));
    return x * sigmoid(x);
}

// d act / dx
static float act_grad(const float x, const int kind)
{
    if (kind == 0) return 0.5f * (1.0f + erf_rational(x * SQRT1_2)) + x * INV_SQRT_2PI * exp(-0.5f * x * x);
    if (kind == 1) {
        const float t = tanh_via_exp(GELU_K * (x + GELU_C * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * x * x);
    }
    const float s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

__kernel void activation_forward(__global const float* x, const int offX, __global float* y, const int offY,
                                 const int n, const int kind)
{
    const int i = get_global_id(0);
    if (i < n) y[offY + i] = act(x[offX + i], kind);
}

__kernel void activation_backward(__global const float* dy, const int offDY, __global const float* x, const int offX,
                                  __global float* dx, const int offDX, const int n, const int kind, const int accumulate)
{
    const int i = get_global_id(0);
    if (i < n) store(dx, offDX + i, dy[offDY + i] * act_grad(x[offX + i], kind), accumulate);
}

// SwiGLU on x = [rows, 2h] (gate a | value b): y[r, i] = silu(a) * b, one work-item per output.
__kernel void swiglu_forward(__global const float* x, const int offX, __global float* y, const int offY,
                             const int n, const int h)
{
    const int i = get_global_id(0);
    if (i >= n) return;
    const size_t a = offX + (size_t)(i / h) * 2 * h + i % h;
    y[offY + i] = act(x[a], 2) * x[a + h];
}

// da = dY * b * silu'(a), db = dY * silu(a)
__kernel void swiglu_backward(__global const float* dy, const int offDY, __global const float* x, const int offX,
                              __global float* dx, const int offDX, const int n, const int h, const int accumulate)
{
    const int i = get_global_id(0);
    if (i >= n) return;
    const size_t k = (size_t)(i / h) * 2 * h + i % h;
    const float a = x[offX + k], b = x[offX + k + h], g = dy[offDY + i];
    store(dx, offDX + k, g * b * act_grad(a, 2), accumulate);
    store(dx, offDX + k + h, g * act(a, 2), accumulate);
}

// ---------------------------------------------------------------------------
// Softmax of scale * x along rows of f, max-subtracted; one work-group per row.
// causal: row r is query i = r mod f of a [*, T, T] score block and sees keys j <= i;
// masked entries are written as exactly 0 (exp(-inf)).
__kernel void softmax_forward(__global const float* x, const int offX, __global float* y, const int offY,
                              const int f, const float scale, const int causal)
{
    __local float red[MAX_GROUP];
    const int row = get_group_id(0), lid = get_local_id(0), step = get_local_size(0);
    __global const float* xr = x + offX + (size_t)row * f;
    __global float* yr = y + offY + (size_t)row * f;
    const int visible = causal ? row % f + 1 : f;
    const int quads = visible / 4;

    float4 m4 = -INFINITY;
    for (int q = lid; q < quads; q += step) m4 = fmax(m4, scale * vload4(q, xr));
    float m = fmax(fmax(m4.x, m4.y), fmax(m4.z, m4.w));
    for (int j = 4 * quads + lid; j < visible; j += step) m = fmax(m, scale * xr[j]);
    m = group_max(m, red);
    // One exp per element (four at a time): e is parked in y, then scaled.
    // y may be x: each item rewrites only the elements it alone read.
    float4 s4 = 0.0f;
    for (int q = lid; q < quads; q += step) { const float4 e = exp(scale * vload4(q, xr) - m); vstore4(e, q, yr); s4 += e; }
    float s = hsum(s4);
    for (int j = 4 * quads + lid; j < visible; j += step) { const float e = exp(scale * xr[j] - m); yr[j] = e; s += e; }
    const float inv = 1.0f / group_sum(s, red);
    for (int q = lid; q < quads; q += step) vstore4(vload4(q, yr) * inv, q, yr);
    for (int j = 4 * quads + lid; j < visible; j += step) yr[j] *= inv;
    for (int j = visible + lid; j < f; j += step) yr[j] = 0.0f;   // masked keys, untouched above
}

// dX = scale * y * (dY - sum_j dY_j y_j), one work-group per row.
__kernel void softmax_backward(__global const float* dy, const int offDY, __global const float* y, const int offY,
                               __global float* dx, const int offDX, const int f, const float scale, const int accumulate)
{
    __local float red[MAX_GROUP];
    const int row = get_group_id(0), lid = get_local_id(0), step = get_local_size(0);
    const size_t base = (size_t)row * f;
    float s = 0.0f;
    __global const float* dyr = dy + offDY + base;
    __global const float* yr = y + offY + base;
    const int quads = f / 4;
    float4 s4 = 0.0f;
    for (int q = lid; q < quads; q += step) s4 += vload4(q, dyr) * vload4(q, yr);
    s += hsum(s4);
    for (int j = 4 * quads + lid; j < f; j += step) s += dyr[j] * yr[j];
    const float dot = group_sum(s, red);
    __global float* dxr = dx + offDX + base;
    for (int q = lid; q < quads; q += step) store4(dxr, q, scale * vload4(q, yr) * (vload4(q, dyr) - dot), accumulate);
    for (int j = 4 * quads + lid; j < f; j += step) store(dxr, j, scale * yr[j] * (dyr[j] - dot), accumulate);
}

// out[o] = x[src(o)] for a permutation of up to six axes. Output dims d0..d5
// (unused = 1, on the left) and, per output axis, the input stride of the axis
// it came from. Launch dimension 1 is the outer index o1 over d0..d4, so the
// div/mod work is once per output row of d5; dimension 0 walks that row with a
// stride of its global size (64 on GPUs: coalesced; 1 on CPUs: one sequential
// loop per row). Reads are contiguous when the innermost axis stays innermost
// (s5 == 1, the attention head split/merge).
__kernel void transpose_axes(__global const float* x, const int offX, __global float* out, const int offOut,
                             const int d0, const int d1, const int d2, const int d3, const int d4, const int d5,
                             const int s0, const int s1, const int s2, const int s3, const int s4, const int s5)
{
    const int o1 = get_global_id(1);
    int rem = o1, src = 0;
    src += (rem % d4) * s4; rem /= d4;
    src += (rem % d3) * s3; rem /= d3;
    src += (rem % d2) * s2; rem /= d2;
    src += (rem % d1) * s1; rem /= d1;
    src += rem * s0;
    for (int k = get_global_id(0); k < d5; k += get_global_size(0))
        out[offOut + (size_t)o1 * d5 + k] = x[offX + src + k * s5];
}

// ---------------------------------------------------------------------------
// Cross-entropy with label smoothing s, one work-group per row of C logits z:
//   q = (1 - s) onehot(label) + s / C,  lse = log sum exp z
//   loss = -sum q (z - lse) = lse - (1 - s) z_label - (s / C) sum z
//   dz = gscale * (softmax(z) - q)     (gscale = gradientScale / n)
// A negative label is an ignored row (loss 0, dz 0); n, the rows with a label
// >= 0, is counted on the device first (count_targets), so nothing syncs.

// n[0] = the number of labels >= 0; one work-group.
__kernel void count_targets(__global const int* labels, const int offL, __global int* n, const int rows)
{
    __local int buf[MAX_GROUP];
    int mine = 0, total;
    for (int i = get_local_id(0); i < rows; i += get_local_size(0)) mine += labels[offL + i] >= 0;
    group_scan(mine, buf, &total);
    if (get_local_id(0) == 0) n[0] = total;
}

__kernel void cross_entropy_rows(__global const float* z, const int offZ, __global const int* labels, const int offL,
                                 __global float* rowLoss, const int offLoss,
                                 __global float* dz, const int offDZ,
                                 const int C, const float smoothing, const int hasGrad,
                                 __global const int* targets, const int rows,
                                 const float gradientScale, const float gscaleAllRows)
{
    __local float red[MAX_GROUP];
    const int row = get_group_id(0), lid = get_local_id(0), step = get_local_size(0);
    __global const float* zr = z + offZ + (size_t)row * C;
    __global float* dr = dz + offDZ + (size_t)row * C;
    const int label = labels[offL + row];
    const int quads = C / 4;
    // A negative label is an ignored row: it reads no logits (zero-length loops)
    // and writes zeros, but meets every barrier. No early return: on PoCL a
    // return before the barriers (even one never taken) corrupted memory.
    const int ignored = label < 0, valid = !ignored && label < C;
    const int seen = ignored ? 0 : C, seenQuads = seen / 4;
    // With every row a target, the host's gradientScale / rows: the same bits as
    // before ignored rows existed (a device division need not be correctly rounded).
    const int n = targets[0];
    const float gscale = n == rows ? gscaleAllRows : gradientScale / n;

    float4 m4 = -INFINITY, sz4 = 0.0f;
    for (int q = lid; q < seenQuads; q += step) { const float4 v = vload4(q, zr); m4 = fmax(m4, v); sz4 += v; }
    float m = fmax(fmax(m4.x, m4.y), fmax(m4.z, m4.w)), sz = hsum(sz4);
    for (int j = 4 * seenQuads + lid; j < seen; j += step) { m = fmax(m, zr[j]); sz += zr[j]; }
    m = group_max(m, red);
    sz = group_sum(sz, red);
    // One exp per element (four at a time); with a gradient, e = exp(z - m) is parked in dz.
    float4 se4 = 0.0f;
    for (int q = lid; q < seenQuads; q += step) {
        const float4 e = exp(vload4(q, zr) - m);
        if (hasGrad) vstore4(e, q, dr);
        se4 += e;
    }
    float se = hsum(se4);
    for (int j = 4 * seenQuads + lid; j < seen; j += step) {
        const float e = exp(zr[j] - m);
        if (hasGrad) dr[j] = e;
        se += e;
    }
    se = group_sum(se, red);
    const float lse = m + log(se);

    if (lid == 0) {
        rowLoss[offLoss + row] = ignored ? 0.0f : valid ? lse - (1.0f - smoothing) * zr[label] - smoothing / C * sz : NAN;
    }
    if (hasGrad) {
        // dz = gscale * (e / se - q); the same split as the exp pass, so each
        // item rescales only what it parked (an ignored row parked nothing: zeros).
        const float inv = 1.0f / se, hit = 1.0f - smoothing, base = smoothing / C;
        for (int q = lid; q < quads; q += step) {
            const int d = label - 4 * q;   // the label's lane in this quad, if any
            const float4 q4 = (float4)(d == 0 ? hit : 0.0f, d == 1 ? hit : 0.0f, d == 2 ? hit : 0.0f, d == 3 ? hit : 0.0f) + base;
            vstore4(ignored ? (float4)0.0f : valid ? gscale * (vload4(q, dr) * inv - q4) : (float4)NAN, q, dr);
        }
        for (int j = 4 * quads + lid; j < C; j += step) {
            const float qj = (j == label ? hit : 0.0f) + base;
            dr[j] = ignored ? 0.0f : valid ? gscale * (dr[j] * inv - qj) : NAN;
        }
    }
}

// out[0] = sum of v[0..rows) / targets[0] (ignored rows hold 0), or 0 with no
// targets: one work-group, strided partial sums then the tree.
__kernel void mean_loss(__global const float* v, const int offV, __global float* out, const int offOut, const int rows,
                        __global const int* targets)
{
    __local float red[MAX_GROUP];
    const int lid = get_local_id(0);
    float s = 0.0f;
    for (int i = lid; i < rows; i += get_local_size(0)) s += v[offV + i];
    s = group_sum(s, red);
    const int n = targets[0];
    if (lid == 0) out[offOut] = n > 0 ? s / n : 0.0f;
}

// out[r] = first index of the row maximum, one work-item per row (evaluation only).
__kernel void argmax_rows(__global const float* x, const int offX, __global int* out, const int offOut,
                          const int rows, const int f)
{
    const int r = get_global_id(0);
    if (r >= rows) return;
    __global const float* xr = x + offX + (size_t)r * f;
    int best = 0;
    for (int j = 1; j < f; j++) if (xr[j] > xr[best]) best = j;
    out[offOut + r] = best;
}

// ---------------------------------------------------------------------------
// Token embedding: table [V, D], ids [rows], out / dOut [rows, D].

// out[r, j] = table[ids[r], j], one work-item per output element; an id outside
// 0..<V writes NaN (nothing reports it to the host).
__kernel void embedding_forward(__global const float* table, const int offT, __global const int* ids, const int offI,
                                __global float* out, const int offO, const int V, const int D, const int n)
{
    const int i = get_global_id(0);
    if (i >= n) return;
    const int r = i / D, j = i - r * D;
    const int id = ids[offI + r];
    out[offO + i] = id >= 0 && id < V ? table[offT + (size_t)id * D + j] : NAN;
}

// embedding_forward for CPU devices: one work-item per row, a contiguous copy.
__kernel void embedding_forward_rowwise(__global const float* table, const int offT, __global const int* ids,
                                        const int offI, __global float* out, const int offO,
                                        const int V, const int D, const int rows)
{
    const int r = get_global_id(0);
    if (r >= rows) return;
    const int id = ids[offI + r];
    __global float* o = out + offO + (size_t)r * D;
    if (id >= 0 && id < V) {
        __global const float* src = table + offT + (size_t)id * D;
        for (int j = 0; j < D; j++) o[j] = src[j];
    } else {
        for (int j = 0; j < D; j++) o[j] = NAN;
    }
}

// dTable[id, :] += dOut[r, :] for every row r holding id, added in ascending r
// with no float atomics: one work-group per row r; the group of the first row
// holding an id does all of that id's rows and the others return. Items own the
// columns lid, lid + g, ... of the table row; the rows holding the id are found a
// tile of g ids at a time (one compare per item, a prefix sum packs the hits in
// order). Work: O(rows / g) compares per item per group, dOut read once.
__kernel void embedding_backward(__global const float* dOut, const int offD, __global const int* ids, const int offI,
                                 __global float* dTable, const int offT, const int rows, const int V, const int D)
{
    __local int buf[MAX_GROUP];
    __local int hits[MAX_GROUP];
    const int row = get_group_id(0), lid = get_local_id(0), g = get_local_size(0);
    const int id = ids[offI + row];
    // No early return (on PoCL one before a barrier corrupted memory): a skipped
    // id, or one an earlier row's group adds, scans no tiles instead.
    const int live = id >= 0 && id < V;
    int earlier = 0, total;
    if (live) for (int s = lid; s < row; s += g) earlier |= ids[offI + s] == id;
    group_scan(earlier, buf, &total);
    const int end = live && total == 0 ? rows : row;
    __global float* t = dTable + offT + (size_t)(live ? id : 0) * D;
    for (int s0 = row; s0 < end; s0 += g) {
        const int s = s0 + lid;
        const int hit = s < rows && ids[offI + s] == id;
        const int slot = group_scan(hit, buf, &total);
        if (hit) hits[slot - 1] = s;
        barrier(CLK_LOCAL_MEM_FENCE);
        // The next tile writes hits only after its scan's barriers: no barrier after the reads.
        for (int k = 0; k < total; k++) {
            __global const float* src = dOut + offD + (size_t)hits[k] * D;
            for (int j = lid; j < D; j += g) t[j] += src[j];
        }
    }
}

// embedding_backward for CPU devices: one work-item per row (the first holding
// its id adds all of that id's rows, whole contiguous rows in ascending order).
__kernel void embedding_backward_rowwise(__global const float* dOut, const int offD, __global const int* ids,
                                         const int offI, __global float* dTable, const int offT,
                                         const int rows, const int V, const int D)
{
    const int row = get_global_id(0);
    if (row >= rows) return;
    const int id = ids[offI + row];
    if (id < 0 || id >= V) return;
    for (int s = 0; s < row; s++) if (ids[offI + s] == id) return;
    __global float* t = dTable + offT + (size_t)id * D;
    for (int s = row; s < rows; s++) {
        if (ids[offI + s] != id) continue;
        __global const float* src = dOut + offD + (size_t)s * D;
        for (int j = 0; j < D; j++) t[j] += src[j];
    }
}

// ---------------------------------------------------------------------------
// Dropout mask from a counter-based hash of (seed, element index): two rounds of
// the murmur3 finaliser; Reference.dropoutHash computes the same bits on the host.
static uint fmix32(uint h)
{
    h ^= h >> 16; h *= 0x85EBCA6Bu;
    h ^= h >> 13; h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

// y (+)= keep ? x * scale : 0, keep = hash >= threshold (threshold = p * 2^32,
// scale = 1 / (1 - p)); dropAll for p >= 1.
__kernel void dropout(__global const float* x, const int offX, __global float* y, const int offY, const int n,
                      const uint threshold, const uint seedLo, const uint seedHi, const float scale,
                      const int dropAll, const int accumulate)
{
    const int i = get_global_id(0);
    if (i >= n) return;
    uint h = fmix32(((uint)i * 0x9E3779B9u) ^ seedLo);
    h = fmix32(h ^ seedHi ^ 0x7F4A7C15u);
    const float v = (!dropAll && h >= threshold) ? x[offX + i] * scale : 0.0f;
    store(y, offY + i, v, accumulate);
}

// x[i] += std * z_i, z_i standard normal by Box-Muller from the counter hash of
// (seed, 2i) and (seed, 2i+1): the noise is a function of the seed and the
// index, so nothing is uploaded (Reference.gaussianNoise gives the same values).
__kernel void add_gaussian_noise(__global float* x, const int offX, const int n, const float stdev,
                                 const uint seedLo, const uint seedHi)
{
    const int i = get_global_id(0);
    if (i >= n) return;
    uint a = fmix32(((uint)(2 * i) * 0x9E3779B9u) ^ seedLo);
    a = fmix32(a ^ seedHi ^ 0x7F4A7C15u);
    uint b = fmix32(((uint)(2 * i + 1) * 0x9E3779B9u) ^ seedLo);
    b = fmix32(b ^ seedHi ^ 0x7F4A7C15u);
    const float u1 = ((float)(a >> 8) + 1.0f) * (1.0f / 16777216.0f);   // (0, 1]
    const float u2 = (float)(b >> 8) * (1.0f / 16777216.0f);            // [0, 1)
    x[offX + i] += stdev * sqrt(-2.0f * log(u1)) * cos(6.28318530717958648f * u2);
}

// y[r, :] (+)= x[r, :] * m[r], rows of f (stochastic depth).
__kernel void scale_rows(__global const float* x, const int offX, __global const float* m, const int offM,
                         __global float* y, const int offY, const int n, const int f, const int accumulate)
{
    const int i = get_global_id(0);
    if (i < n) store(y, offY + i, x[offX + i] * m[offM + i / f], accumulate);
}

// y[b, j] = mean over t in [t0, t1) of x[b, t, j]; one work-item per output.
__kernel void mean_pool(__global const float* x, const int offX, __global float* y, const int offY,
                        const int B, const int T, const int H, const int t0, const int t1)
{
    const int i = get_global_id(0);
    if (i >= B * H) return;
    const int b = i / H, j = i % H;
    float s = 0.0f;
    for (int t = t0; t < t1; t++) s += x[offX + ((size_t)b * T + t) * H + j];
    y[offY + i] = s / (t1 - t0);
}

// dX[b, t, j] (+)= dY[b, j] / (t1 - t0) for t in [t0, t1); other tokens get 0 (or keep dX).
__kernel void mean_pool_backward(__global const float* dy, const int offDY, __global float* dx, const int offDX,
                                 const int B, const int T, const int H, const int t0, const int t1, const int accumulate)
{
    const int i = get_global_id(0);
    if (i >= B * T * H) return;
    const int j = i % H, t = (i / H) % T, b = i / (T * H);
    const int inside = t >= t0 && t < t1;
    if (!inside && accumulate) return;
    store(dx, offDX + i, inside ? dy[offDY + b * H + j] / (t1 - t0) : 0.0f, accumulate);
}
