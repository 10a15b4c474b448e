// Token embedding of the CPU backend (NNOps.embedding / embeddingBackward).
// table and dtable are [v, d] row-major; ids hold rows ids; out and dout are
// [rows, d]. See Sources/MoECompute/Ops/NN.swift.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// out[r, :] = table[ids[r], :] for the rows ids[0..<rows) (out points at the
/// first of them); an id outside 0..<v writes a row of NaN.
void ck_embedding_rows(const float *table, size_t v, size_t d, const int32_t *ids, size_t rows, float *out);

/// Columns c0..<c0+width of dtable[ids[r], :] += dout[r, :] for every r in
/// ascending order (the order that makes the sums deterministic); ids outside
/// 0..<v are skipped.
void ck_embedding_backward_columns(const float *dout, const int32_t *ids, size_t rows, size_t v, size_t d,
                                   size_t c0, size_t width, float *dtable);

#ifdef __cplusplus
}
#endif
