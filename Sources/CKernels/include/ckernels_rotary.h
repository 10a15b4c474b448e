// Rotary position embedding of the CPU backend (PositionOps.rotary). Element c
// of head h of token t is x[t * ld + column + h * head_dim + c]; elements c and
// c + head_dim/2 rotate together by the angle (float)positions[t] * inv_freq[c]
// (negated when inverse is nonzero). See Sources/MoECompute/Ops/Rotary.swift.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Rotates tokens t0..<t1 in place. inv_freq holds head_dim/2 floats.
void ck_rotary(float *x, const int32_t *positions, const float *inv_freq,
               int64_t heads, int64_t head_dim, int64_t ld, int64_t column,
               int64_t inverse, int64_t t0, int64_t t1);

#ifdef __cplusplus
}
#endif
