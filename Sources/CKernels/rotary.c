// Rotary position embedding (see include/ckernels_rotary.h). Per token: the
// cos / sin of each frequency once (float64 of the float32 angle, rounded:
// the correctly rounded values), applied to every head. The rotation is
// Hugging Face's x * cos + rotate_half(x) * sin with its float32 roundings:
// products rounded, then the sum; no fused multiply-add.
#include "ckernels_rotary.h"
#include "dispatch.h"
#include <math.h>

#pragma STDC FP_CONTRACT OFF

enum { CK_ROPE_CHUNK = 64 };

CK_DISPATCH
void ck_rotary(float *x, const int32_t *positions, const float *inv_freq,
               int64_t heads, int64_t head_dim, int64_t ld, int64_t column,
               int64_t inverse, int64_t t0, int64_t t1)
{
    const int64_t half = head_dim / 2;
    float cs[CK_ROPE_CHUNK], sn[CK_ROPE_CHUNK];
    for (int64_t t = t0; t < t1; t++) {
        const float p = (float)positions[t];
        float *row = x + t * ld + column;
        for (int64_t i0 = 0; i0 < half; i0 += CK_ROPE_CHUNK) {
            const int64_t n = half - i0 < CK_ROPE_CHUNK ? half - i0 : CK_ROPE_CHUNK;
            for (int64_t i = 0; i < n; i++) {
                const float angle = p * inv_freq[i0 + i];   // one float32 rounding, like torch
                const double a = (double)angle;
                cs[i] = (float)cos(a);
                sn[i] = inverse ? -(float)sin(a) : (float)sin(a);
            }
            for (int64_t h = 0; h < heads; h++) {
                float *lo = row + h * head_dim + i0, *hi = lo + half;
                for (int64_t i = 0; i < n; i++) {
                    const float a = lo[i], b = hi[i];
                    const float ac = a * cs[i], bs = b * sn[i], bc = b * cs[i], as = a * sn[i];
                    lo[i] = ac - bs;
                    hi[i] = bc + as;
                }
            }
        }
    }
}
