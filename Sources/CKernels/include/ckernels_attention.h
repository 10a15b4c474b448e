// Fused attention tiles of the CPU backend (AttentionOps). The Swift side
// validates the arguments and splits the tiles over the cores; each call here
// runs one contiguous range of tiles with one scratch buffer. Layout and
// semantics are those of `AttentionConfig` (Sources/MoECompute/Ops/Attention.swift):
// element c of head h of token t of batch b of X lives at
// X[b * bsX + t * ldX + h * head_dim + c].
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// The shape and layout of one attention call (mirrors `AttentionConfig`).
typedef struct ck_attention_config {
    int64_t batch, q_heads, kv_heads;
    int64_t q_len, k_len, head_dim;
    /// Nonzero: query i sees keys j <= k_len - q_len + i.
    int64_t causal;
    /// Row strides (elements between tokens) of Q, K, V, O.
    int64_t ldq, ldk, ldv, ldo;
    /// Elements between batches of Q, K, V, O.
    int64_t bsq, bsk, bsv, bso;
    /// Multiplies the scores before the softmax.
    float scale;
} ck_attention_config;

/// Floats of scratch one forward / backward call needs (64-byte aligned).
size_t ck_attention_forward_scratch(const ck_attention_config *c);
size_t ck_attention_backward_scratch(const ck_attention_config *c);

/// Forward over tiles tile_begin..<tile_end, tile = b * q_heads + h: o rows and
/// lse[tile * q_len + i] = log-sum-exp of the scaled visible scores (-inf and an
/// all-zero o row for a query that sees no key).
void ck_attention_forward(const ck_attention_config *c, const float *q, const float *k, const float *v,
                          float *o, float *lse, int64_t tile_begin, int64_t tile_end, float *scratch);

/// Backward over tiles tile_begin..<tile_end, tile = b * kv_heads + g: overwrites
/// the dk, dv rows of kv head g (summing the group's query heads in order) and the
/// dq rows of the group's query heads.
void ck_attention_backward(const ck_attention_config *c, const float *q, const float *k, const float *v,
                           const float *o, const float *lse, const float *dout,
                           float *dq, float *dk, float *dv, int64_t tile_begin, int64_t tile_end, float *scratch);

#ifdef __cplusplus
}
#endif
