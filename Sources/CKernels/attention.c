// Fused attention tiles (forward and backward) of the CPU backend; see
// include/ckernels_attention.h. Plain loops over fixed-width chunks that clang
// vectorises (one zmm per 16 lanes in the x86-64-v4 clone):
//
// - Scores `scale * Q K^T` (and `dO V^T`) for a block of R query rows against
//   16 or 32 keys at a time, from a per-tile transposed K (V): each head-dim
//   step is one load of 16 keys and R multiply-adds with broadcast query values,
//   the accumulators in registers.
// - Softmax per row over whole 16-lane chunks: keys a row does not see (causal,
//   or padding) get -inf, whose exp is exactly 0; exp is a polynomial inlined
//   into the loop (no libm call per element).
// - Weighted row sums (`P V`, `dS K`) and the rank-R updates of dK, dV run over
//   16 or 32 head-dim columns at a time.
//
// Every tile's arithmetic is in a fixed order that does not depend on which
// thread runs it or on the range split, so results are bit-identical run to run.
#include <math.h>
#include <string.h>

#include "ckernels.h"
#include "dispatch.h"
#include "ck_math.h"

#define CK_W 16 /* lanes of one chunk: one zmm, two ymm or four xmm */
#define CK_R 4  /* query rows per block */


/// Keys query i sees: 0..<att_visible(i).
CK_INLINE int64_t att_visible(const ck_attention_config *c, int64_t i) {
    if (!c->causal) return c->k_len;
    int64_t n = c->k_len - c->q_len + i + 1;
    return n < 0 ? 0 : (n > c->k_len ? c->k_len : n);
}

/// The first query that sees a key (q_len if none does); visible counts grow with i.
CK_INLINE int64_t att_first_row(const ck_attention_config *c) {
    if (c->k_len == 0) return c->q_len;
    if (!c->causal) return 0;
    int64_t f = c->q_len - c->k_len;
    return f < 0 ? 0 : f;
}

CK_INLINE int64_t att_round(int64_t n) { return (n + CK_W - 1) / CK_W * CK_W; }

/// Row stride of a transposed K or V: whole chunks of 16, an odd number of them
/// (rows an even number of 64-byte lines apart crowd into the same cache sets).
static int64_t att_ldt(int64_t tk) {
    int64_t p = att_round(tk);
    if ((p / CK_W) % 2 == 0) p += CK_W;
    return p;
}

size_t ck_attention_forward_scratch(const ck_attention_config *c) {
    return (size_t)(att_ldt(c->k_len) * (c->head_dim + CK_R));
}

size_t ck_attention_backward_scratch(const ck_attention_config *c) {
    return (size_t)(att_ldt(c->k_len) * (2 * c->head_dim + 2 * CK_R));
}

/// exp(x) as `ck_expf` (about 1 ulp), except that x < -87 (where float exp is
/// subnormal or 0), -inf included, gives exactly 0: masked scores vanish.
CK_INLINE float att_exp(float x) { return x < -87.0f ? 0.0f : ck_expf(x); }

/// t[c * ldt + j] = rows[j * ld + c] for j < n, c < d.
CK_INLINE void att_transpose(const float *rows, int64_t ld, int64_t n, int64_t d, float *t, int64_t ldt) {
    for (int64_t j = 0; j < n; j++) {
        const float *rj = rows + j * ld;
        for (int64_t c = 0; c < d; c++) t[c * ldt + j] = rj[c];
    }
}

/// Zeroes columns n..<round16(n) of the d rows of t (the last chunk's padding,
/// read by the score loops and masked after; zero keeps it finite).
CK_INLINE void att_zero_padding(float *t, int64_t ldt, int64_t n, int64_t d) {
    const int64_t end = att_round(n);
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = n; j < end; j++) t[c * ldt + j] = 0.0f;
}

/// x[0..<d] = 0 in whole chunks (inline stores, not a memset call per short row).
CK_INLINE void att_zero_row(float *x, int64_t d) {
    int64_t c = 0;
    for (; c + CK_W <= d; c += CK_W)
        for (int l = 0; l < CK_W; l++) x[c + l] = 0.0f;
    for (; c < d; c++) x[c] = 0.0f;
}

/// Horizontal sum and max of 16 lanes, as a tree (vector shuffles, not a chain).
CK_INLINE float att_hsum(float v[CK_W]) {
    for (int w = CK_W / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) v[l] = v[l] + v[l + w];
    return v[0];
}

CK_INLINE float att_hmax(float v[CK_W]) {
    for (int w = CK_W / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) v[l] = v[l + w] > v[l] ? v[l + w] : v[l];
    return v[0];
}

/// s[r * lds + l] = scale * sum_c x[r][c] * t[c * ldt + l] for r < rows, l < width.
CK_INLINE void att_scores(const int rows, const int width, const float *const x[CK_R], const float *t, int64_t ldt,
                          int64_t d, float scale, float *s, int64_t lds) {
    float acc[CK_R][2 * CK_W];
    for (int r = 0; r < rows; r++)
        for (int l = 0; l < width; l++) acc[r][l] = 0.0f;
    for (int64_t c = 0; c < d; c++) {
        const float *tc = t + c * ldt;
        for (int r = 0; r < rows; r++) {
            const float xv = x[r][c];
            for (int l = 0; l < width; l++) acc[r][l] += xv * tc[l];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int l = 0; l < width; l++) s[r * lds + l] = scale * acc[r][l];
}

/// Scores of `rows` query rows against keys 0..<span (a multiple of 16).
CK_INLINE void att_score_rows(const int rows, const float *const x[CK_R], const float *t, int64_t ldt, int64_t d,
                              float scale, float *s, int64_t span) {
    int64_t j0 = 0;
    for (; j0 + 2 * CK_W <= span; j0 += 2 * CK_W) att_scores(rows, 2 * CK_W, x, t + j0, ldt, d, scale, s + j0, ldt);
    if (j0 < span) att_scores(rows, CK_W, x, t + j0, ldt, d, scale, s + j0, ldt);
}

/// out[r][c0 + l] = alpha[r] * sum_{j < n} p[r * ldp + j] * src[j * ld + c0 + l] for l < width.
CK_INLINE void att_combine_chunk(const int rows, const int width, const float *p, int64_t ldp, const float *src,
                                 int64_t ld, int64_t n, float *const out[CK_R], const float alpha[CK_R], int64_t c0) {
    float acc[CK_R][2 * CK_W];
    for (int r = 0; r < rows; r++)
        for (int l = 0; l < width; l++) acc[r][l] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *sj = src + j * ld + c0;
        for (int r = 0; r < rows; r++) {
            const float w = p[r * ldp + j];
            for (int l = 0; l < width; l++) acc[r][l] += w * sj[l];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int l = 0; l < width; l++) out[r][c0 + l] = alpha[r] * acc[r][l];
}

/// out[r][c] = alpha[r] * sum_{j < n} p[r * ldp + j] * src[j * ld + c] for c < d.
CK_INLINE void att_combine(const int rows, const float *p, int64_t ldp, const float *src, int64_t ld, int64_t n,
                           int64_t d, float *const out[CK_R], const float alpha[CK_R]) {
    int64_t c0 = 0;
    for (; c0 + 2 * CK_W <= d; c0 += 2 * CK_W) att_combine_chunk(rows, 2 * CK_W, p, ldp, src, ld, n, out, alpha, c0);
    if (c0 + CK_W <= d) {
        att_combine_chunk(rows, CK_W, p, ldp, src, ld, n, out, alpha, c0);
        c0 += CK_W;
    }
    for (int r = 0; r < rows; r++) {
        for (int64_t c = c0; c < d; c++) {
            float a = 0.0f;
            for (int64_t j = 0; j < n; j++) a += p[r * ldp + j] * src[j * ld + c];
            out[r][c] = alpha[r] * a;
        }
    }
}

/// y[j * ld + c0 + l] (+)= sum_r w[r * ldw + j] * x[r][c0 + l] for j < n, l < width (r
/// in order): rows j < init accumulate, rows from init on are assigned.
CK_INLINE void att_update_chunk(const int rows, const int width, const float *w, int64_t ldw,
                                const float *const x[CK_R], int64_t c0, float *y, int64_t ld, int64_t n, int64_t init) {
    float xv[CK_R][2 * CK_W];
    for (int r = 0; r < rows; r++)
        for (int l = 0; l < width; l++) xv[r][l] = x[r][c0 + l];
    const int64_t split = init < n ? init : n;
    for (int64_t j = 0; j < split; j++) {
        float wj[CK_R];
        for (int r = 0; r < rows; r++) wj[r] = w[r * ldw + j];
        float *yj = y + j * ld + c0;
        for (int l = 0; l < width; l++) {
            float a = yj[l];
            for (int r = 0; r < rows; r++) a += wj[r] * xv[r][l];
            yj[l] = a;
        }
    }
    for (int64_t j = split; j < n; j++) {
        float wj[CK_R];
        for (int r = 0; r < rows; r++) wj[r] = w[r * ldw + j];
        float *yj = y + j * ld + c0;
        for (int l = 0; l < width; l++) {
            float a = wj[0] * xv[0][l];
            for (int r = 1; r < rows; r++) a += wj[r] * xv[r][l];
            yj[l] = a;
        }
    }
}

/// y[j * ld + c] (+)= sum_r w[r * ldw + j] * x[r][c] for j < n, c < d (rows from init on assigned).
CK_INLINE void att_update(const int rows, const float *w, int64_t ldw, const float *const x[CK_R], float *y, int64_t ld,
                          int64_t n, int64_t d, int64_t init) {
    int64_t c0 = 0;
    for (; c0 + 2 * CK_W <= d; c0 += 2 * CK_W) att_update_chunk(rows, 2 * CK_W, w, ldw, x, c0, y, ld, n, init);
    if (c0 + CK_W <= d) {
        att_update_chunk(rows, CK_W, w, ldw, x, c0, y, ld, n, init);
        c0 += CK_W;
    }
    if (c0 < d) {
        for (int64_t j = 0; j < n; j++) {
            float *yj = y + j * ld;
            for (int64_t c = c0; c < d; c++) {
                float a = j < init ? yj[c] : 0.0f;
                for (int r = 0; r < rows; r++) a += w[r * ldw + j] * x[r][c];
                yj[c] = a;
            }
        }
    }
}

CK_INLINE float att_dot(const float *a, const float *b, int64_t d) {
    float acc[CK_W];
    for (int l = 0; l < CK_W; l++) acc[l] = 0.0f;
    int64_t c = 0;
    for (; c + CK_W <= d; c += CK_W)
        for (int l = 0; l < CK_W; l++) acc[l] += a[c + l] * b[c + l];
    float s = att_hsum(acc);
    for (; c < d; c++) s += a[c] * b[c];
    return s;
}

/// Softmax row over keys 0..<span (whole chunks): s[j] = exp(s[j] - max) for j < n
/// and 0 for n <= j < span, in place; returns the max over j < n, *sum gets the sum.
CK_INLINE float att_softmax_row(float *s, int64_t n, int64_t span, float *sum) {
    float mv[CK_W];
    for (int l = 0; l < CK_W; l++) mv[l] = -INFINITY;
    for (int64_t j0 = 0; j0 < span; j0 += CK_W) {
        const int32_t left = (int32_t)(n - j0 < CK_W ? n - j0 : CK_W);
        for (int l = 0; l < CK_W; l++) {
            const float x = l < left ? s[j0 + l] : -INFINITY;
            mv[l] = x > mv[l] ? x : mv[l];
        }
    }
    const float m = att_hmax(mv);
    float sv[CK_W];
    for (int l = 0; l < CK_W; l++) sv[l] = 0.0f;
    for (int64_t j0 = 0; j0 < span; j0 += CK_W) {
        const int32_t left = (int32_t)(n - j0 < CK_W ? n - j0 : CK_W);
        for (int l = 0; l < CK_W; l++) {
            const float x = att_exp(s[j0 + l] - m), e = l < left ? x : 0.0f;
            s[j0 + l] = e;
            sv[l] += e;
        }
    }
    *sum = att_hsum(sv);
    return m;
}

/// Forward for `rows` consecutive query rows (all seeing >= 1 key; n[] grows).
CK_INLINE void att_forward_block(const int rows, const ck_attention_config *c, const float *const qr[CK_R],
                                 float *const orow[CK_R], float *lrow, const int64_t n[CK_R], const float *kT,
                                 int64_t ldt, const float *vb, float *s) {
    const int64_t d = c->head_dim, nmax = n[rows - 1], span = att_round(nmax);
    att_score_rows(rows, qr, kT, ldt, d, c->scale, s, span);
    float inv[CK_R];
    for (int r = 0; r < rows; r++) {
        float sum;
        const float m = att_softmax_row(s + r * ldt, n[r], span, &sum);
        inv[r] = 1.0f / sum;
        lrow[r] = m + logf(sum);
    }
    att_combine(rows, s, ldt, vb, c->ldv, nmax, d, orow, inv);
}

CK_DISPATCH void ck_attention_forward(const ck_attention_config *c, const float *q, const float *k, const float *v,
                                      float *o, float *lse, int64_t tile_begin, int64_t tile_end, float *scratch) {
    const int64_t d = c->head_dim, hq = c->q_heads, tq = c->q_len, tk = c->k_len;
    const int64_t group = hq / c->kv_heads, ldt = att_ldt(tk), first = att_first_row(c);
    float *kT = scratch, *s = scratch + d * ldt;
    att_zero_padding(kT, ldt, tk, d);
    int64_t cached = -1;
    for (int64_t tile = tile_begin; tile < tile_end; tile++) {
        const int64_t b = tile / hq, h = tile % hq, g = h / group;
        const float *qb = q + b * c->bsq + h * d, *vb = v + b * c->bsv + g * d;
        float *ob = o + b * c->bso + h * d, *lb = lse + tile * tq;
        // Consecutive query heads of a group share K^T.
        if (first < tq && cached != b * c->kv_heads + g) {
            att_transpose(k + b * c->bsk + g * d, c->ldk, tk, d, kT, ldt);
            cached = b * c->kv_heads + g;
        }
        for (int64_t i = 0; i < first; i++) {
            att_zero_row(ob + i * c->ldo, d);
            lb[i] = -INFINITY;
        }
        int64_t i = first;
        for (; i + CK_R <= tq; i += CK_R) {
            const float *qr[CK_R];
            float *orow[CK_R];
            int64_t n[CK_R];
            for (int r = 0; r < CK_R; r++) {
                qr[r] = qb + (i + r) * c->ldq;
                orow[r] = ob + (i + r) * c->ldo;
                n[r] = att_visible(c, i + r);
            }
            att_forward_block(CK_R, c, qr, orow, lb + i, n, kT, ldt, vb, s);
        }
        for (; i < tq; i++) {
            const float *qr[CK_R] = {qb + i * c->ldq};
            float *orow[CK_R] = {ob + i * c->ldo};
            const int64_t n[CK_R] = {att_visible(c, i)};
            att_forward_block(1, c, qr, orow, lb + i, n, kT, ldt, vb, s);
        }
    }
}

/// Backward for `rows` consecutive query rows of one query head (all seeing >= 1 key).
CK_INLINE void att_backward_block(const int rows, const ck_attention_config *c, const float *const qr[CK_R],
                                  const float *const orow[CK_R], const float *const dor[CK_R],
                                  float *const dqr[CK_R], const float *lrow, const int64_t n[CK_R],
                                  const float *kT, const float *vT, int64_t ldt, const float *kb,
                                  float *dkb, float *dvb, float *p, float *ds, int64_t *written) {
    const int64_t d = c->head_dim, nmax = n[rows - 1], span = att_round(nmax);
    const float scale = c->scale;
    // P_ij = exp(scale q_i . k_j - L_i) (0 for keys row i does not see); dP_ij = dO_i . v_j.
    att_score_rows(rows, qr, kT, ldt, d, scale, p, span);
    att_score_rows(rows, dor, vT, ldt, d, 1.0f, ds, span);
    for (int r = 0; r < rows; r++) {
        float *restrict pr = p + r * ldt, *restrict dsr = ds + r * ldt;
        // dS_ij = scale P_ij (dP_ij - D_i), D_i = dO_i . O_i; both 0 for keys past n.
        const float lse = lrow[r], delta = att_dot(dor[r], orow[r], d);
        for (int64_t j0 = 0; j0 < span; j0 += CK_W) {
            const int32_t left = (int32_t)(n[r] - j0 < CK_W ? n[r] - j0 : CK_W);
            for (int l = 0; l < CK_W; l++) {
                const float x = att_exp(pr[j0 + l] - lse), e = l < left ? x : 0.0f;
                const float g = scale * e * (dsr[j0 + l] - delta);
                pr[j0 + l] = e;
                dsr[j0 + l] = l < left ? g : 0.0f;
            }
        }
    }
    static const float ones[CK_R] = {1.0f, 1.0f, 1.0f, 1.0f};
    att_combine(rows, ds, ldt, kb, c->ldk, nmax, d, dqr, ones); // dQ_i = sum_j dS_ij k_j
    // dK_j += sum_i dS_ij q_i, dV_j += sum_i P_ij dO_i; rows from *written on are new.
    att_update(rows, ds, ldt, qr, dkb, c->ldk, nmax, d, *written);
    att_update(rows, p, ldt, dor, dvb, c->ldv, nmax, d, *written);
    if (nmax > *written) *written = nmax;
}

CK_DISPATCH void ck_attention_backward(const ck_attention_config *c, const float *q, const float *k, const float *v,
                                       const float *o, const float *lse, const float *dout, float *dq, float *dk,
                                       float *dv, int64_t tile_begin, int64_t tile_end, float *scratch) {
    const int64_t d = c->head_dim, hq = c->q_heads, hkv = c->kv_heads, tq = c->q_len, tk = c->k_len;
    const int64_t group = hq / hkv, ldt = att_ldt(tk), first = att_first_row(c);
    float *kT = scratch, *vT = kT + d * ldt, *p = vT + d * ldt, *ds = p + CK_R * ldt;
    att_zero_padding(kT, ldt, tk, d);
    att_zero_padding(vT, ldt, tk, d);
    for (int64_t tile = tile_begin; tile < tile_end; tile++) {
        const int64_t b = tile / hkv, g = tile % hkv;
        const float *kb = k + b * c->bsk + g * d, *vb = v + b * c->bsv + g * d;
        float *dkb = dk + b * c->bsk + g * d, *dvb = dv + b * c->bsv + g * d;
        // dK, dV rows 0..<written hold sums; the first update of a row assigns it.
        int64_t written = 0;
        if (first < tq) {
            att_transpose(kb, c->ldk, tk, d, kT, ldt);
            att_transpose(vb, c->ldv, tk, d, vT, ldt);
        }
        for (int64_t h = g * group; h < (g + 1) * group; h++) {
            const float *qb = q + b * c->bsq + h * d, *ob = o + b * c->bso + h * d, *dob = dout + b * c->bso + h * d;
            float *dqb = dq + b * c->bsq + h * d;
            const float *lb = lse + (b * hq + h) * tq;
            for (int64_t i = 0; i < first; i++) att_zero_row(dqb + i * c->ldq, d);
            int64_t i = first;
            for (; i + CK_R <= tq; i += CK_R) {
                const float *qr[CK_R], *orow[CK_R], *dor[CK_R];
                float *dqr[CK_R];
                int64_t n[CK_R];
                for (int r = 0; r < CK_R; r++) {
                    qr[r] = qb + (i + r) * c->ldq;
                    dqr[r] = dqb + (i + r) * c->ldq;
                    orow[r] = ob + (i + r) * c->ldo;
                    dor[r] = dob + (i + r) * c->ldo;
                    n[r] = att_visible(c, i + r);
                }
                att_backward_block(CK_R, c, qr, orow, dor, dqr, lb + i, n, kT, vT, ldt, kb, dkb, dvb, p, ds, &written);
            }
            for (; i < tq; i++) {
                const float *qr[CK_R] = {qb + i * c->ldq}, *orow[CK_R] = {ob + i * c->ldo}, *dor[CK_R] = {dob + i * c->ldo};
                float *dqr[CK_R] = {dqb + i * c->ldq};
                const int64_t n[CK_R] = {att_visible(c, i)};
                att_backward_block(1, c, qr, orow, dor, dqr, lb + i, n, kT, vT, ldt, kb, dkb, dvb, p, ds, &written);
            }
        }
        // Keys no query sees.
        for (int64_t j = written; j < tk; j++) {
            att_zero_row(dkb + j * c->ldk, d);
            att_zero_row(dvb + j * c->ldv, d);
        }
    }
}
