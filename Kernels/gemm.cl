// General matrix multiply, row-major, in three grouping modes:
//   GROUP_BATCH    C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b]   (strided batches)
//   GROUP_ROWS     expert e owns rows offsets[e]..offsets[e+1] of A and C and
//                  multiplies them by its own B[e]  (grouped GEMM, MoE forward and dX)
//   GROUP_K        C[e] = alpha * op(A_e) op(B_e) + beta * C[e], where A_e and B_e
//                  are rows offsets[e]..offsets[e+1] of A and B: the contraction runs
//                  over expert e's rows  (weight gradients dW_e = dY_e^T X_e)
// op(A) is M x K, op(B) is K x N. `offsets` (E + 1 ints) stays on the device:
// no host read-back. Epilogue: out = alpha * acc + beta * C, then + bias[e]
// (per column), then the activation. Any M, N, K works (zero-padded loads,
// masked stores).
//
// Built with -DGLU=1 the same kernels compute a gated linear unit (SwiGLU):
// op(B) is K x 2N, columns [0, N) the gate and [N, 2N) the value, and
//   C[:, n] = silu(alpha * acc_gate + bias[n]) * (alpha * acc_value + bias[N + n])
// with each work-item holding both accumulators, so the 2N-wide product is
// never written out. (beta must be 0.)
#ifndef GLU
#define GLU 0
#endif
// Bias values per group: N, or 2N for the gate and value halves.
#define BIAS_STRIDE (GLU ? 2 * N : N)

#define GROUP_BATCH 0
#define GROUP_ROWS 1
#define GROUP_K 2

#define ACT_NONE 0
#define ACT_GELU 1       // x * Phi(x), exact (erf) form
#define ACT_GELU_TANH 2  // tanh approximation
#define ACT_RELU 3
#define ACT_SILU 4

inline float activate(const float x, const int activation)
{
    switch (activation) {
    case ACT_GELU: return 0.5f * x * (1.0f + erf(x * 0.70710678118654752f));
    case ACT_GELU_TANH: return 0.5f * x * (1.0f + tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case ACT_RELU: return fmax(x, 0.0f);
    case ACT_SILU: return x / (1.0f + exp(-x));
    default: return x;
    }
}

// The operands of one group, resolved from the grouping mode.
typedef struct {
    int valid;               // 0: this work-group has nothing to do
    int M, K, rowBase;       // rows this group covers start at rowBase within the group's C
    int a, b, c, bias;       // element offsets of A, B, C and bias for the group
} Group;

// Finds the group a row block belongs to. For GROUP_ROWS, block `blk` of
// ROWS_PER_BLOCK rows walks the experts' blocks in order: expert e owns
// ceil(count_e / ROWS_PER_BLOCK) blocks, so no block straddles two experts.
inline Group resolve_group(const int mode, const int blk, const int rowsPerBlock, const int batch,
                           __global const int* offsets, const int groups,
                           const int M, const int N, const int K,
                           const int lda, const int strideA, const int transA,
                           const int ldb, const int strideB, const int transB,
                           const int ldc, const int strideC)
{
    Group g;
    g.valid = 1; g.M = M; g.K = K; g.rowBase = blk * rowsPerBlock;
    g.a = batch * strideA; g.b = batch * strideB; g.c = batch * strideC; g.bias = 0;
    if (mode == GROUP_ROWS) {
        int first = 0;
        g.valid = 0;
        for (int e = 0; e < groups; e++) {
            const int rows = offsets[e + 1] - offsets[e];
            const int blocks = (rows + rowsPerBlock - 1) / rowsPerBlock;
            if (blk < first + blocks) {
                g.valid = 1;
                g.M = rows;
                g.rowBase = (blk - first) * rowsPerBlock;
                // op(A) rows are A's rows here (transA is not allowed with GROUP_ROWS).
                g.a = offsets[e] * lda;
                g.b = e * strideB;
                g.c = offsets[e] * ldc;
                g.bias = e * BIAS_STRIDE;
                break;
            }
            first += blocks;
        }
    } else if (mode == GROUP_K) {
        // op(A) = A_e^T (transA) or A_e; B_e = rows of B. Contraction length = rows of e.
        const int start = offsets[batch];
        g.K = offsets[batch + 1] - start;
        g.a = transA ? start * lda : start;
        g.b = transB ? start : start * ldb;
        g.c = batch * strideC;
        g.bias = batch * BIAS_STRIDE;
    } else {
        g.bias = 0;
    }
    if (g.rowBase >= g.M) g.valid = 0;
    return g;
}

#ifndef TILE_M
#define TILE_M 64
#endif
#ifndef TILE_N
#define TILE_N 64
#endif
#ifndef TILE_K
#define TILE_K 16
#endif
#ifndef WPT_M
#define WPT_M 4
#endif
#ifndef WPT_N
#define WPT_N 4
#endif

#define THREADS_M (TILE_M / WPT_M)
#define THREADS_N (TILE_N / WPT_N)
#define THREADS (THREADS_M * THREADS_N)

// Element (row, col) of op(X) for a matrix stored row-major with leading dim ld.
#define OP_AT(X, trans, ld, row, col) ((trans) ? (X)[(col) * (ld) + (row)] : (X)[(row) * (ld) + (col)])

// GPU GEMM: a work-group computes a TILE_M x TILE_N block of C; each work-item
// WPT_M x WPT_N outputs held in registers (2D register blocking), with K staged
// through local memory TILE_K at a time. Grid: (N tiles, row blocks, batches).
__kernel __attribute__((reqd_work_group_size(THREADS_N, THREADS_M, 1)))
void gemm(const int M, const int N, const int K,
          const float alpha, const float beta,
          __global const float* A, const int offA, const int lda, const int strideA, const int transA,
          __global const float* B, const int offB, const int ldb, const int strideB, const int transB,
          __global float* C, const int offC, const int ldc, const int strideC,
          const int mode, __global const int* offsets, const int offOffsets, const int groups,
          __global const float* bias, const int offBias, const int hasBias, const int activation)
{
    const Group g = resolve_group(mode, get_group_id(1), TILE_M, get_group_id(2), offsets + offOffsets, groups,
                                  M, N, K, lda, strideA, transA, ldb, strideB, transB, ldc, strideC);
    // Uniform per work-group, so returning before the barriers is safe.
    if (!g.valid) return;
    A += offA + g.a;
    B += offB + g.b;
    C += offC + g.c;
    bias += offBias + g.bias;
    const int Mg = g.M, Kg = g.K;

    const int tn = get_local_id(0), tm = get_local_id(1);
    const int lid = tm * THREADS_N + tn;
    const int row0 = g.rowBase, col0 = get_group_id(0) * TILE_N;

    // +1 padding keeps strided local reads off the same bank.
    __local float As[TILE_K][TILE_M + 1];
    __local float Bs[TILE_K][TILE_N + 1];
    float acc[WPT_M][WPT_N];
    for (int i = 0; i < WPT_M; i++)
        for (int j = 0; j < WPT_N; j++) acc[i][j] = 0.0f;
#if GLU
    __local float Bv[TILE_K][TILE_N + 1];
    float accV[WPT_M][WPT_N];
    for (int i = 0; i < WPT_M; i++)
        for (int j = 0; j < WPT_N; j++) accV[i][j] = 0.0f;
#endif

    for (int k0 = 0; k0 < Kg; k0 += TILE_K) {
        // Cooperative loads; the fastest-moving index follows memory order.
        for (int e = lid; e < TILE_M * TILE_K; e += THREADS) {
            const int m = transA ? e % TILE_M : e / TILE_K;
            const int k = transA ? e / TILE_M : e % TILE_K;
            const int gm = row0 + m, gk = k0 + k;
            As[k][m] = (gm < Mg && gk < Kg) ? OP_AT(A, transA, lda, gm, gk) : 0.0f;
        }
        for (int e = lid; e < TILE_N * TILE_K; e += THREADS) {
            const int n = transB ? e / TILE_K : e % TILE_N;
            const int k = transB ? e % TILE_K : e / TILE_N;
            const int gn = col0 + n, gk = k0 + k;
            Bs[k][n] = (gn < N && gk < Kg) ? OP_AT(B, transB, ldb, gk, gn) : 0.0f;
#if GLU
            Bv[k][n] = (gn < N && gk < Kg) ? OP_AT(B, transB, ldb, gk, gn + N) : 0.0f;
#endif
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        for (int k = 0; k < TILE_K; k++) {
            float a[WPT_M], b[WPT_N];
            for (int i = 0; i < WPT_M; i++) a[i] = As[k][tm + i * THREADS_M];
            for (int j = 0; j < WPT_N; j++) b[j] = Bs[k][tn + j * THREADS_N];
            for (int i = 0; i < WPT_M; i++)
                for (int j = 0; j < WPT_N; j++) acc[i][j] = fma(a[i], b[j], acc[i][j]);
#if GLU
            for (int j = 0; j < WPT_N; j++) b[j] = Bv[k][tn + j * THREADS_N];
            for (int i = 0; i < WPT_M; i++)
                for (int j = 0; j < WPT_N; j++) accV[i][j] = fma(a[i], b[j], accV[i][j]);
#endif
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (int i = 0; i < WPT_M; i++) {
        const int m = row0 + tm + i * THREADS_M;
        if (m >= Mg) continue;
        for (int j = 0; j < WPT_N; j++) {
            const int n = col0 + tn + j * THREADS_N;
            if (n >= N) continue;
#if GLU
            float gate = alpha * acc[i][j], value = alpha * accV[i][j];
            if (hasBias) { gate += bias[n]; value += bias[N + n]; }
            C[m * ldc + n] = gate / (1.0f + exp(-gate)) * value;
#else
            // beta == 0 must not read C: it may hold NaN from an earlier use.
            float out = alpha * acc[i][j] + (beta == 0.0f ? 0.0f : beta * C[m * ldc + n]);
            if (hasBias) out += bias[n];
            C[m * ldc + n] = activate(out, activation);
#endif
        }
    }
}

// ---------------------------------------------------------------------------
// CPU-device GEMM (PoCL and other CPU OpenCL drivers). A CPU core wants the
// shape of an OpenBLAS micro-kernel, not a GPU tile: each work-item keeps a
// CPU_ROWS x (16*CPU_VECS) block of C in float16 registers, broadcasts one
// element of op(A) per row and streams one row of B per k. B must be K x N
// row-major (the host packs B^T first); op(A) is read in place. Consecutive
// work-items walk down M so the K x 16*CPU_VECS panel of B stays in cache.
#ifndef CPU_ROWS
#define CPU_ROWS 4
#endif
#ifndef CPU_VECS
#define CPU_VECS 2
#endif
#define CPU_COLS (16 * CPU_VECS)

__kernel void gemm_cpu(const int M, const int N, const int K,
                       const float alpha, const float beta,
                       __global const float* A, const int offA, const int lda, const int strideA, const int transA,
                       __global const float* B, const int offB, const int ldb, const int strideB,
                       __global float* C, const int offC, const int ldc, const int strideC,
                       const int mode, __global const int* offsets, const int offOffsets, const int groups,
                       __global const float* bias, const int offBias, const int hasBias, const int activation)
{
    const Group g = resolve_group(mode, get_global_id(0), CPU_ROWS, get_global_id(2), offsets + offOffsets, groups,
                                  M, N, K, lda, strideA, transA, ldb, strideB, 0, ldc, strideC);
    const int n0 = get_global_id(1) * CPU_COLS;
    if (!g.valid || n0 >= N) return;
    A += offA + g.a;
    B += offB + g.b;
    C += offC + g.c;
    bias += offBias + g.bias;
    const int Mg = g.M, Kg = g.K, m0 = g.rowBase;

    // op(A)[m, k] = transA ? A[k * lda + m] : A[m * lda + k]. Rows past M repeat
    // the last row (a valid address); their results are not stored.
    const int stepRow = transA ? 1 : lda, stepK = transA ? lda : 1;
    __global const float* rowA[CPU_ROWS];
    for (int r = 0; r < CPU_ROWS; r++) rowA[r] = A + min(m0 + r, Mg - 1) * stepRow;

    if (n0 + CPU_COLS <= N) {
        float16 acc[CPU_ROWS][CPU_VECS];
        for (int r = 0; r < CPU_ROWS; r++)
            for (int v = 0; v < CPU_VECS; v++) acc[r][v] = (float16)(0.0f);
#if GLU
        float16 accV[CPU_ROWS][CPU_VECS];
        for (int r = 0; r < CPU_ROWS; r++)
            for (int v = 0; v < CPU_VECS; v++) accV[r][v] = (float16)(0.0f);
#endif
        for (int k = 0; k < Kg; k++) {
            float16 b[CPU_VECS];
            for (int v = 0; v < CPU_VECS; v++) b[v] = vload16(0, B + k * ldb + n0 + 16 * v);
            for (int r = 0; r < CPU_ROWS; r++) {
                const float a = rowA[r][k * stepK];
                for (int v = 0; v < CPU_VECS; v++) acc[r][v] = fma((float16)(a), b[v], acc[r][v]);
            }
#if GLU
            for (int v = 0; v < CPU_VECS; v++) b[v] = vload16(0, B + k * ldb + N + n0 + 16 * v);
            for (int r = 0; r < CPU_ROWS; r++) {
                const float a = rowA[r][k * stepK];
                for (int v = 0; v < CPU_VECS; v++) accV[r][v] = fma((float16)(a), b[v], accV[r][v]);
            }
#endif
        }
        for (int r = 0; r < CPU_ROWS && m0 + r < Mg; r++) {
            __global float* c = C + (m0 + r) * ldc + n0;
            for (int v = 0; v < CPU_VECS; v++) {
#if GLU
                float16 gate = alpha * acc[r][v], value = alpha * accV[r][v];
                if (hasBias) { gate += vload16(0, bias + n0 + 16 * v); value += vload16(0, bias + N + n0 + 16 * v); }
                vstore16(gate / (1.0f + exp(-gate)) * value, 0, c + 16 * v);
                continue;
#endif
                float16 out = alpha * acc[r][v];
                if (beta != 0.0f) out += beta * vload16(0, c + 16 * v);
                if (hasBias) out += vload16(0, bias + n0 + 16 * v);
                if (activation != ACT_NONE) {
                    float x[16];
                    vstore16(out, 0, x);
                    for (int l = 0; l < 16; l++) x[l] = activate(x[l], activation);
                    out = vload16(0, x);
                }
                vstore16(out, 0, c + 16 * v);
            }
        }
    } else {
        // Right edge: scalar columns.
        for (int n = n0; n < N; n++) {
            float acc[CPU_ROWS];
            for (int r = 0; r < CPU_ROWS; r++) acc[r] = 0.0f;
            for (int k = 0; k < Kg; k++) {
                const float b = B[k * ldb + n];
                for (int r = 0; r < CPU_ROWS; r++) acc[r] = fma(rowA[r][k * stepK], b, acc[r]);
            }
#if GLU
            float accV[CPU_ROWS];
            for (int r = 0; r < CPU_ROWS; r++) accV[r] = 0.0f;
            for (int k = 0; k < Kg; k++) {
                const float b = B[k * ldb + N + n];
                for (int r = 0; r < CPU_ROWS; r++) accV[r] = fma(rowA[r][k * stepK], b, accV[r]);
            }
            for (int r = 0; r < CPU_ROWS && m0 + r < Mg; r++) {
                float gate = alpha * acc[r], value = alpha * accV[r];
                if (hasBias) { gate += bias[n]; value += bias[N + n]; }
                C[(m0 + r) * ldc + n] = gate / (1.0f + exp(-gate)) * value;
            }
            continue;
#endif
            for (int r = 0; r < CPU_ROWS && m0 + r < Mg; r++) {
                float out = alpha * acc[r] + (beta == 0.0f ? 0.0f : beta * C[(m0 + r) * ldc + n]);
                if (hasBias) out += bias[n];
                C[(m0 + r) * ldc + n] = activate(out, activation);
            }
        }
    }
}

// dst[b] = src[b]^T for a rows x cols matrix with leading dimension ld:
// packs B^T into the K x N layout gemm_cpu streams.
__kernel void transpose(__global const float* src, const int offSrc, const int ld, const int strideSrc,
                        __global float* dst, const int rows, const int cols)
{
    const int c = get_global_id(0), r = get_global_id(1), b = get_global_id(2);
    if (r >= rows || c >= cols) return;
    dst[b * rows * cols + c * rows + r] = src[offSrc + b * strideSrc + r * ld + c];
}
