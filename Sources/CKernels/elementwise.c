// The CPU backend's element-wise and row/column-reduction loops (NNOps) as
// plain C loops for clang's vectoriser. Each entry point is cloned for
// x86-64-v4 (AVX-512: zmm), x86-64-v3 (AVX2 + FMA: ymm) and the baseline
// (CK_DISPATCH), so the same source runs at the widest width the CPU has.
//
// Determinism: float sums are never reassociated by the compiler, so every row
// reduction here keeps CK_LANES partial sums (element j < n - n % 16 goes to
// lane j % 16), adds them pairwise in a fixed order, then adds the tail in
// order: the same bits on every clone and every thread split. Column sums keep the backend's fixed
// order: per column, blocks of 64 rows summed in row order into a partial,
// the partials added in order to a zeroed total.
//
// Element-wise loops carry `vectorize(assume_safety)`: an element is read and
// written only at its own index, so in-place calls (y == x) stay correct while
// the loops vectorise without run-time overlap checks.
#include <math.h>
#include <string.h>

#include "ckernels.h"
#include "dispatch.h"
#include "ck_math.h"

#define CK_LANES 16
#define CK_BLOCK_ROWS 64
#define CK_ELEMENTWISE _Pragma("clang loop vectorize(assume_safety)")

// MARK: Scalar maths (inlined into the vector loops)

// erf: the odd/even rational approximation of XLA's and Eigen's float erf
// (numerator degree 13, denominator degree 8) on [-3.9, 3.9], exactly +-1
// beyond (the rational's value there, inf or NaN for huge inputs, is replaced,
// so no input clamp). Max absolute error 4e-7 against float64 erf; NaN in gives
// NaN (both compares false). Kernels/nn.cl (erf_rational) computes the same on OpenCL.
CK_INLINE float ck_erf1(float a) {
    float x2 = a * a;
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
    float y = (p * a) / q;
    y = a > 3.9f ? 1.0f : y;
    return a < -3.9f ? -1.0f : y;
}

CK_INLINE float ck_gelu_erf(float x) { return 0.5f * x * (1.0f + ck_erf1(x * 0.70710678118654752f)); }

// cdf + x pdf. Where exp(-x^2 / 2) underflows (below e^-87, |x| > 13.19) the
// x pdf term is 0: ck_expf saturates at e^-87 = 1.6e-38 instead, which times a
// huge x would leave a wrong term (2.2 at x = 3.4e38). NaN still propagates.
CK_INLINE float ck_gelu_erf_grad(float x) {
    float cdf = 0.5f * (1.0f + ck_erf1(x * 0.70710678118654752f));
    float t = -0.5f * x * x;
    float xpdf = x * 0.39894228040143268f * ck_expf(t);
    return cdf + (t < -87.0f ? 0.0f : xpdf);
}

CK_INLINE float ck_sigmoid(float x) { return 1.0f / (1.0f + ck_expf(-x)); }

// tanh through one exp: exact limits +-1, absolute error a few ulp.
CK_INLINE float ck_tanh(float u) { return 1.0f - 2.0f / (1.0f + ck_expf(2.0f * u)); }

// tanh GELU: 0.5 x (1 + tanh(k (x + c x^3))), k = sqrt(2/pi), c = 0.044715.
CK_INLINE float ck_gelu_tanh(float x) {
    return 0.5f * x * (1.0f + ck_tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

CK_INLINE float ck_gelu_tanh_grad(float x) {
    const float k = 0.79788456080286536f, c = 0.044715f;
    float x2 = x * x;
    float t = ck_tanh(k * (x + c * x2 * x));
    float outer = 0.5f * (1.0f + t);
    float inner = (0.5f * k) * x * (1.0f - t * t) * (1.0f + (3.0f * c) * x2);
    return outer + inner;
}

CK_INLINE float ck_silu(float x) { return x * ck_sigmoid(x); }

CK_INLINE float ck_silu_grad(float x) {
    float s = ck_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

// MARK: Lane reductions

// Adds the CK_LANES partial sums pairwise (8 + 8, 4 + 4, ...): fixed order.
CK_INLINE float ck_lanes_sum(float *acc) {
    for (int w = CK_LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

CK_INLINE float ck_lanes_max(float *acc) {
    for (int w = CK_LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] = acc[l + w] >= acc[l] ? acc[l + w] : acc[l];
    return acc[0];
}

// sum_{j < n} TERM (TERM an expression in j): full groups of CK_LANES in lanes
// (registers), the last n % CK_LANES terms in a scalar added last.
#define CK_LANE_SUM(result, n, TERM)                                            \
    do {                                                                        \
        float acc_[CK_LANES] = {0};                                             \
        size_t j0_ = 0;                                                         \
        for (; j0_ + CK_LANES <= (n); j0_ += CK_LANES)                          \
            for (size_t l_ = 0; l_ < CK_LANES; l_++) {                          \
                size_t j = j0_ + l_;                                            \
                acc_[l_] += (TERM);                                             \
            }                                                                   \
        float tail_ = 0;                                                        \
        for (size_t j = j0_; j < (n); j++) tail_ += (TERM);                     \
        (result) = ck_lanes_sum(acc_) + tail_;                                  \
    } while (0)

// max_{j < n} TERM (-inf for n = 0); a NaN term is skipped (v >= m is false).
#define CK_LANE_MAX(result, n, TERM)                                            \
    do {                                                                        \
        float acc_[CK_LANES];                                                   \
        for (size_t l_ = 0; l_ < CK_LANES; l_++) acc_[l_] = -INFINITY;          \
        size_t j0_ = 0;                                                         \
        for (; j0_ + CK_LANES <= (n); j0_ += CK_LANES)                          \
            for (size_t l_ = 0; l_ < CK_LANES; l_++) {                          \
                size_t j = j0_ + l_;                                            \
                float v_ = (TERM);                                              \
                acc_[l_] = v_ >= acc_[l_] ? v_ : acc_[l_];                      \
            }                                                                   \
        float tail_ = -INFINITY;                                                \
        for (size_t j = j0_; j < (n); j++) {                                    \
            float v_ = (TERM);                                                  \
            tail_ = v_ >= tail_ ? v_ : tail_;                                   \
        }                                                                       \
        float lanes_ = ck_lanes_max(acc_);                                      \
        (result) = tail_ >= lanes_ ? tail_ : lanes_;                            \
    } while (0)

// y[j] = exp(scale * x[j] - m) for j < n: groups of 16, then one of 8 (so the
// short rows of a router softmax or a 10-class loss still run vector code), then
// single elements. Element-wise: the same value whichever path an element takes.
CK_INLINE void ck_exp_shifted(const float *restrict x, float *restrict y, size_t n, float scale, float m) {
    size_t j = 0;
    for (; j + CK_LANES <= n; j += CK_LANES)
        for (size_t l = 0; l < CK_LANES; l++) y[j + l] = ck_expf(scale * x[j + l] - m);
    if (j + 8 <= n) {
        for (size_t l = 0; l < 8; l++) y[j + l] = ck_expf(scale * x[j + l] - m);
        j += 8;
    }
    for (; j < n; j++) y[j] = ck_expf(scale * x[j] - m);
}

// MARK: Activations

CK_DISPATCH void ck_activation(int function, const float *x, float *y, size_t n) {
    switch (function) {
    case CK_GELU_ERF:
        CK_ELEMENTWISE for (size_t i = 0; i < n; i++) y[i] = ck_gelu_erf(x[i]);
        break;
    case CK_GELU_TANH:
        CK_ELEMENTWISE for (size_t i = 0; i < n; i++) y[i] = ck_gelu_tanh(x[i]);
        break;
    default:
        CK_ELEMENTWISE for (size_t i = 0; i < n; i++) y[i] = ck_silu(x[i]);
        break;
    }
}

#define CK_BACKWARD_LOOP(GRAD)                                                          \
    do {                                                                                \
        if (accumulate) {                                                               \
            CK_ELEMENTWISE for (size_t i = 0; i < n; i++) dx[i] += dy[i] * GRAD(x[i]);  \
        } else {                                                                        \
            CK_ELEMENTWISE for (size_t i = 0; i < n; i++) dx[i] = dy[i] * GRAD(x[i]);   \
        }                                                                               \
    } while (0)

CK_DISPATCH void ck_activation_backward(int function, const float *dy, const float *x, float *dx, size_t n,
                                        int accumulate) {
    switch (function) {
    case CK_GELU_ERF: CK_BACKWARD_LOOP(ck_gelu_erf_grad); break;
    case CK_GELU_TANH: CK_BACKWARD_LOOP(ck_gelu_tanh_grad); break;
    default: CK_BACKWARD_LOOP(ck_silu_grad); break;
    }
}

// SwiGLU over rows of [gate | up] (2h wide): y = silu(gate) * up, h wide.
CK_DISPATCH void ck_swiglu(const float *x, float *y, size_t rows, size_t h) {
    for (size_t r = 0; r < rows; r++) {
        const float *restrict a = x + r * 2 * h, *restrict b = a + h;
        float *restrict yr = y + r * h;
        CK_ELEMENTWISE for (size_t i = 0; i < h; i++) yr[i] = ck_silu(a[i]) * b[i];
    }
}

// Its gradient: d gate = dy * up * silu'(gate), d up = dy * silu(gate).
CK_DISPATCH void ck_swiglu_backward(const float *dy, const float *x, float *dx, size_t rows, size_t h, int accumulate) {
    for (size_t r = 0; r < rows; r++) {
        const float *restrict a = x + r * 2 * h, *restrict b = a + h, *restrict g = dy + r * h;
        float *restrict da = dx + r * 2 * h, *restrict db = da + h;
        if (accumulate) {
            CK_ELEMENTWISE for (size_t i = 0; i < h; i++) {
                da[i] += g[i] * b[i] * ck_silu_grad(a[i]);
                db[i] += g[i] * ck_silu(a[i]);
            }
        } else {
            CK_ELEMENTWISE for (size_t i = 0; i < h; i++) {
                da[i] = g[i] * b[i] * ck_silu_grad(a[i]);
                db[i] = g[i] * ck_silu(a[i]);
            }
        }
    }
}

CK_DISPATCH void ck_erf(const float *a, float *y, size_t n) {
    CK_ELEMENTWISE for (size_t i = 0; i < n; i++) y[i] = ck_erf1(a[i]);
}

// MARK: Column sums

// One group of CK_LANES columns: partial and total in registers, rows streamed.
CK_INLINE void ck_sum_rows_group(const float *restrict x, size_t rows, size_t ld, float *restrict out,
                                 int accumulate) {
    float total[CK_LANES] = {0};
    for (size_t r0 = 0; r0 < rows; r0 += CK_BLOCK_ROWS) {
        size_t r1 = rows - r0 < CK_BLOCK_ROWS ? rows : r0 + CK_BLOCK_ROWS;
        float part[CK_LANES] = {0};
        for (size_t r = r0; r < r1; r++)
            for (size_t l = 0; l < CK_LANES; l++) part[l] += x[r * ld + l];
        for (size_t l = 0; l < CK_LANES; l++) total[l] += part[l];
    }
    for (size_t l = 0; l < CK_LANES; l++) out[l] = accumulate ? out[l] + total[l] : total[l];
}

// One column, the same order (for the last cols % CK_LANES columns).
CK_INLINE void ck_sum_rows_column(const float *restrict x, size_t rows, size_t ld, float *restrict out,
                                  int accumulate) {
    float total = 0;
    for (size_t r0 = 0; r0 < rows; r0 += CK_BLOCK_ROWS) {
        size_t r1 = rows - r0 < CK_BLOCK_ROWS ? rows : r0 + CK_BLOCK_ROWS;
        float part = 0;
        for (size_t r = r0; r < r1; r++) part += x[r * ld];
        total += part;
    }
    *out = accumulate ? *out + total : total;
}

CK_DISPATCH void ck_sum_rows(const float *x, size_t rows, size_t ld, size_t cols, float *out, int accumulate) {
    size_t c = 0;
    for (; c + CK_LANES <= cols; c += CK_LANES) ck_sum_rows_group(x + c, rows, ld, out + c, accumulate);
    for (; c < cols; c++) ck_sum_rows_column(x + c, rows, ld, out + c, accumulate);
}

// dGamma / dBeta for one group of CK_LANES columns (`centered`: LayerNorm).
CK_INLINE void ck_norm_param_group(const float *restrict dy, const float *restrict x, const float *mean,
                                   const float *rstd, size_t rows, size_t ld, float *restrict dg,
                                   float *restrict db, int accumulate, int centered) {
    float tg[CK_LANES] = {0}, tb[CK_LANES] = {0};
    for (size_t r0 = 0; r0 < rows; r0 += CK_BLOCK_ROWS) {
        size_t r1 = rows - r0 < CK_BLOCK_ROWS ? rows : r0 + CK_BLOCK_ROWS;
        float pg[CK_LANES] = {0}, pb[CK_LANES] = {0};
        for (size_t r = r0; r < r1; r++) {
            const float mu = centered ? mean[r] : 0.0f, rs = rstd[r];
            const float *dyr = dy + r * ld, *xr = x + r * ld;
            for (size_t l = 0; l < CK_LANES; l++) {
                float d = dyr[l];
                pg[l] += d * (xr[l] - mu) * rs;
                pb[l] += d;
            }
        }
        for (size_t l = 0; l < CK_LANES; l++) { tg[l] += pg[l]; tb[l] += pb[l]; }
    }
    for (size_t l = 0; l < CK_LANES; l++) dg[l] = accumulate ? dg[l] + tg[l] : tg[l];
    if (centered)
        for (size_t l = 0; l < CK_LANES; l++) db[l] = accumulate ? db[l] + tb[l] : tb[l];
}

CK_INLINE void ck_norm_param_column(const float *restrict dy, const float *restrict x, const float *mean,
                                    const float *rstd, size_t rows, size_t ld, float *restrict dg,
                                    float *restrict db, int accumulate, int centered) {
    float tg = 0, tb = 0;
    for (size_t r0 = 0; r0 < rows; r0 += CK_BLOCK_ROWS) {
        size_t r1 = rows - r0 < CK_BLOCK_ROWS ? rows : r0 + CK_BLOCK_ROWS;
        float pg = 0, pb = 0;
        for (size_t r = r0; r < r1; r++) {
            const float mu = centered ? mean[r] : 0.0f;
            float d = dy[r * ld];
            pg += d * (x[r * ld] - mu) * rstd[r];
            pb += d;
        }
        tg += pg;
        tb += pb;
    }
    *dg = accumulate ? *dg + tg : tg;
    if (centered) *db = accumulate ? *db + tb : tb;
}

CK_DISPATCH void ck_norm_param_grads(const float *dy, const float *x, const float *mean, const float *rstd,
                                     size_t rows, size_t ld, size_t cols, float *dgamma, float *dbeta,
                                     int accumulate) {
    size_t c = 0;
    if (dbeta && mean) {
        for (; c + CK_LANES <= cols; c += CK_LANES)
            ck_norm_param_group(dy + c, x + c, mean, rstd, rows, ld, dgamma + c, dbeta + c, accumulate, 1);
        for (; c < cols; c++)
            ck_norm_param_column(dy + c, x + c, mean, rstd, rows, ld, dgamma + c, dbeta + c, accumulate, 1);
    } else {
        for (; c + CK_LANES <= cols; c += CK_LANES)
            ck_norm_param_group(dy + c, x + c, NULL, rstd, rows, ld, dgamma + c, NULL, accumulate, 0);
        for (; c < cols; c++)
            ck_norm_param_column(dy + c, x + c, NULL, rstd, rows, ld, dgamma + c, NULL, accumulate, 0);
    }
}

// MARK: Normalisation rows

CK_DISPATCH void ck_norm_forward(const float *x, const float *gamma, const float *beta, float eps,
                                 float *y, float *mean, float *rstd, size_t rows, size_t f) {
    for (size_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * f;
        float *restrict yr = y + r * f;
        float mu = 0, ss;
        if (beta) {
            float s;
            CK_LANE_SUM(s, f, xr[j]);
            mu = s / (float)f;
        }
        // Two passes: the variance of (x - mean), not E[x^2] - mean^2.
        CK_LANE_SUM(ss, f, (xr[j] - mu) * (xr[j] - mu));
        float rs = 1.0f / sqrtf(ss / (float)f + eps);
        if (beta) {
            for (size_t j = 0; j < f; j++) yr[j] = (xr[j] - mu) * rs * gamma[j] + beta[j];
        } else {
            for (size_t j = 0; j < f; j++) yr[j] = xr[j] * rs * gamma[j];
        }
        if (mean) mean[r] = mu;
        rstd[r] = rs;
    }
}

CK_DISPATCH void ck_norm_backward_rows(const float *dy, const float *x, const float *gamma, const float *mean,
                                       const float *rstd, float *dx, size_t rows, size_t f, int accumulate) {
    const int centered = mean != NULL;
    for (size_t r = 0; r < rows; r++) {
        const float *restrict dyr = dy + r * f, *restrict xr = x + r * f;
        float *restrict dxr = dx + r * f;
        const float mu = centered ? mean[r] : 0.0f, rs = rstd[r];
        float sg = 0, sgx;
        if (centered) CK_LANE_SUM(sg, f, dyr[j] * gamma[j]);
        CK_LANE_SUM(sgx, f, dyr[j] * gamma[j] * (xr[j] - mu));
        sgx *= rs;
        const float meanG = sg / (float)f, meanGX = sgx / (float)f;
        if (accumulate) {
            for (size_t j = 0; j < f; j++) dxr[j] += rs * (dyr[j] * gamma[j] - meanG - (xr[j] - mu) * rs * meanGX);
        } else {
            for (size_t j = 0; j < f; j++) dxr[j] = rs * (dyr[j] * gamma[j] - meanG - (xr[j] - mu) * rs * meanGX);
        }
    }
}

// MARK: Softmax and cross-entropy

CK_DISPATCH void ck_softmax_rows(const float *x, float *y, size_t rows, size_t f, float scale, int causal,
                                 size_t row0) {
    for (size_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * f;
        float *restrict yr = y + r * f;
        const size_t visible = causal ? (row0 + r) % f + 1 : f;
        float m, s;
        CK_LANE_MAX(m, visible, scale * xr[j]);
        // One exp per element: e parked in y, summed, then scaled.
        ck_exp_shifted(xr, yr, visible, scale, m);
        CK_LANE_SUM(s, visible, yr[j]);
        const float inv = 1.0f / s;
        for (size_t j = 0; j < visible; j++) yr[j] *= inv;
        for (size_t j = visible; j < f; j++) yr[j] = 0;
    }
}

CK_DISPATCH void ck_softmax_backward_rows(const float *dy, const float *y, float *dx, size_t rows, size_t f,
                                          float scale, int accumulate) {
    for (size_t r = 0; r < rows; r++) {
        const float *restrict dyr = dy + r * f, *restrict yr = y + r * f;
        float *restrict dxr = dx + r * f;
        float dot;
        CK_LANE_SUM(dot, f, dyr[j] * yr[j]);
        if (accumulate) {
            for (size_t j = 0; j < f; j++) dxr[j] += scale * yr[j] * (dyr[j] - dot);
        } else {
            for (size_t j = 0; j < f; j++) dxr[j] = scale * yr[j] * (dyr[j] - dot);
        }
    }
}

CK_DISPATCH void ck_cross_entropy_rows(const float *z, const int32_t *labels, float s, float *loss, float *dlogits,
                                       float gscale, size_t rows, size_t c) {
    for (size_t r = 0; r < rows; r++) {
        const float *restrict zr = z + r * c;
        const int32_t label = labels[r];
        if (label < 0) {
            // Ignored row (no target): no loss and no gradient.
            loss[r] = 0;
            if (dlogits) memset(dlogits + r * c, 0, c * sizeof(float));
            continue;
        }
        const int valid = (size_t)label < c;
        float m, sz, se;
        CK_LANE_MAX(m, c, zr[j]);
        CK_LANE_SUM(sz, c, zr[j]);
        if (dlogits) {
            // One exp per element: exp(z - m) parked in dLogits.
            float *restrict dr = dlogits + r * c;
            ck_exp_shifted(zr, dr, c, 1.0f, m);
            CK_LANE_SUM(se, c, dr[j]);
        } else {
            CK_LANE_SUM(se, c, ck_expf(zr[j] - m));
        }
        const float lse = m + logf(se);
        // loss = lse - (1 - s) z_label - (s / C) sum z
        loss[r] = valid ? lse - (1.0f - s) * zr[label] - s / (float)c * sz : NAN;
        if (dlogits) {
            float *restrict dr = dlogits + r * c;
            const float inv = 1.0f / se, base = s / (float)c;
            if (valid) {
                for (size_t j = 0; j < c; j++) dr[j] = gscale * (dr[j] * inv - base);
                dr[label] -= gscale * (1.0f - s);
            } else {
                for (size_t j = 0; j < c; j++) dr[j] = NAN;
            }
        }
    }
}
