// Scalar maths the CPU kernels share, written so that clang vectorises the
// loops that call it (no libm calls, no branches).
#pragma once
#include <stdint.h>
#include <string.h>

#define CK_INLINE static inline __attribute__((always_inline))

CK_INLINE uint32_t ck_bits(float x) { uint32_t u; memcpy(&u, &x, sizeof u); return u; }
CK_INLINE float ck_float(uint32_t u) { float x; memcpy(&x, &u, sizeof x); return x; }

// exp (Cephes expf): n = round(x / ln 2), r = x - n ln 2 with ln 2 in two parts,
// a degree-5 polynomial, times 2^n built in the exponent bits. Within 2 ulp of
// libm over [-87, 88], saturating outside; NaN in gives NaN (the compares are
// false for NaN, so the clamps keep it).
CK_INLINE float ck_expf(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    // Adding 1.5 * 2^23 rounds x / ln 2 to an integer n and leaves n in the low
    // mantissa bits (no float-to-int conversion).
    const float magic = 12582912.0f;
    float shifted = xc * 1.44269504088896341f + magic;
    float n = shifted - magic;
    float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float e = p * (r * r) + r + 1.0f;
    uint32_t nbits = ck_bits(shifted) - ck_bits(magic);
    return e * ck_float((nbits + 127u) << 23);
}
