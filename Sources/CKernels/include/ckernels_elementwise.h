// Element-wise and row/column-reduction loops of the CPU backend (NNOps):
// activations, column sums, LayerNorm/RMSNorm, softmax, cross-entropy.
// Every function handles one contiguous range; the Swift side splits the work
// over the cores and validates shapes. Pointers of one call never overlap
// except where noted (accumulating outputs are read and written in place).
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Activation functions, as in `ActivationFunction` (Swift).
enum {
    CK_GELU_ERF = 0,
    CK_GELU_TANH = 1,
    CK_SILU = 2,
};

/// y[i] = f(x[i]) for i < n.
void ck_activation(int function, const float *x, float *y, size_t n);

/// dx[i] (+)= dy[i] * f'(x[i]) for i < n (`accumulate` != 0 adds).
void ck_activation_backward(int function, const float *dy, const float *x, float *dx, size_t n, int accumulate);

/// SwiGLU on `rows` rows of [gate | up] (2h floats each): y (h per row) = silu(gate) * up.
void ck_swiglu(const float *x, float *y, size_t rows, size_t h);

/// The gradient of ck_swiglu: dx rows of [d gate | d up] from dy (h per row).
void ck_swiglu_backward(const float *dy, const float *x, float *dx, size_t rows, size_t h, int accumulate);

/// erf(a) for i < n: the rational approximation the activations use (for tests).
void ck_erf(const float *a, float *y, size_t n);

/// out[c] (+)= sum_r x[r * ld + c] for c < cols: per column, rows in blocks of 64
/// summed in order into a partial, partials added in order to a zeroed total;
/// the same bits whatever the caller's split into column ranges.
void ck_sum_rows(const float *x, size_t rows, size_t ld, size_t cols, float *out, int accumulate);

/// LayerNorm (beta, mean non-null) or RMSNorm (both null) of `rows` rows of `f`:
/// y = (x - mean) * rstd * gamma (+ beta), mean and rstd per row (two passes).
void ck_norm_forward(const float *x, const float *gamma, const float *beta, float eps,
                     float *y, float *mean, float *rstd, size_t rows, size_t f);

/// dX (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dY * gamma, per row
/// (no mean(g) term when `mean` is null: RMSNorm).
void ck_norm_backward_rows(const float *dy, const float *x, const float *gamma, const float *mean,
                           const float *rstd, float *dx, size_t rows, size_t f, int accumulate);

/// dGamma[c] (+)= sum_r dY * (x - mean_r) * rstd_r and dBeta[c] (+)= sum_r dY
/// (`dbeta`, `mean` null for RMSNorm: no centring, no dBeta) for c < cols of
/// rows of `ld` floats (pointers already offset to the first column), in the
/// same fixed order as ck_sum_rows.
void ck_norm_param_grads(const float *dy, const float *x, const float *mean, const float *rstd,
                         size_t rows, size_t ld, size_t cols, float *dgamma, float *dbeta, int accumulate);

/// Softmax of `rows` rows of `f`: y = softmax(scale * x); `causal` keeps
/// columns j <= (row0 + r) % f of row r (row0: the first row's global index)
/// and zeroes the rest.
void ck_softmax_rows(const float *x, float *y, size_t rows, size_t f, float scale, int causal, size_t row0);

/// dX (+)= scale * y * (dY - sum_j dY y) per row.
void ck_softmax_backward_rows(const float *dy, const float *y, float *dx, size_t rows, size_t f,
                              float scale, int accumulate);

/// Cross-entropy with label smoothing `s` for `rows` rows of `c` logits:
/// loss[r] = lse - (1 - s) z_label - (s / c) sum z (NaN for a label >= c, 0
/// for a negative label: an ignored row); with `dlogits`, dlogits = gscale *
/// (softmax - (1 - s) onehot - s / c) (all NaN for a label >= c, all 0 for an
/// ignored row).
void ck_cross_entropy_rows(const float *z, const int32_t *labels, float s, float *loss, float *dlogits,
                           float gscale, size_t rows, size_t c);

#ifdef __cplusplus
}
#endif
