// General matrix multiply, row-major, with strided batches:
//   C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]
// op(A) is M x K, op(B) is K x N, C is M x N. A work-group computes a
// TILE_M x TILE_N block of C; each work-item WPT_M x WPT_N outputs held in
// registers (2D register blocking), with the K dimension staged through local
// memory TILE_K at a time. Edges are zero-padded on load and masked on store,
// so any M, N, K works. Tile sizes are -D parameters chosen per device.

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

__kernel __attribute__((reqd_work_group_size(THREADS_N, THREADS_M, 1)))
void gemm(const int M, const int N, const int K,
          const float alpha, const float beta,
          __global const float* A, const int offA, const int lda, const int strideA, const int transA,
          __global const float* B, const int offB, const int ldb, const int strideB, const int transB,
          __global float* C, const int offC, const int ldc, const int strideC)
{
    const int batch = get_group_id(2);
    A += offA + batch * strideA;
    B += offB + batch * strideB;
    C += offC + batch * strideC;

    const int tn = get_local_id(0), tm = get_local_id(1);
    const int lid = tm * THREADS_N + tn;
    const int row0 = get_group_id(1) * TILE_M, col0 = get_group_id(0) * TILE_N;

    // +1 padding keeps strided local reads off the same bank.
    __local float As[TILE_K][TILE_M + 1];
    __local float Bs[TILE_K][TILE_N + 1];

    float acc[WPT_M][WPT_N];
    for (int i = 0; i < WPT_M; i++)
        for (int j = 0; j < WPT_N; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        // Cooperative loads; the fastest-moving index follows memory order.
        for (int e = lid; e < TILE_M * TILE_K; e += THREADS) {
            const int m = transA ? e % TILE_M : e / TILE_K;
            const int k = transA ? e / TILE_M : e % TILE_K;
            const int gm = row0 + m, gk = k0 + k;
            As[k][m] = (gm < M && gk < K) ? OP_AT(A, transA, lda, gm, gk) : 0.0f;
        }
        for (int e = lid; e < TILE_N * TILE_K; e += THREADS) {
            const int n = transB ? e / TILE_K : e % TILE_N;
            const int k = transB ? e % TILE_K : e / TILE_N;
            const int gn = col0 + n, gk = k0 + k;
            Bs[k][n] = (gn < N && gk < K) ? OP_AT(B, transB, ldb, gk, gn) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        for (int k = 0; k < TILE_K; k++) {
            float a[WPT_M], b[WPT_N];
            for (int i = 0; i < WPT_M; i++) a[i] = As[k][tm + i * THREADS_M];
            for (int j = 0; j < WPT_N; j++) b[j] = Bs[k][tn + j * THREADS_N];
            for (int i = 0; i < WPT_M; i++)
                for (int j = 0; j < WPT_N; j++) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (int i = 0; i < WPT_M; i++) {
        const int m = row0 + tm + i * THREADS_M;
        if (m >= M) continue;
        for (int j = 0; j < WPT_N; j++) {
            const int n = col0 + tn + j * THREADS_N;
            if (n >= N) continue;
            // beta == 0 must not read C: it may hold NaN from an earlier use.
            const float prior = beta == 0.0f ? 0.0f : beta * C[m * ldc + n];
            C[m * ldc + n] = alpha * acc[i][j] + prior;
        }
    }
}
