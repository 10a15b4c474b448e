// Token embedding of the CPU backend (see include/ckernels_embedding.h). The
// backward adds each dOut row into its table row in ascending row order, so a
// vocabulary row hit many times gets the same bits whatever the thread split:
// the caller splits the work by columns, never by rows.
#include <math.h>
#include <string.h>

#include "ckernels_embedding.h"
#include "dispatch.h"

void ck_embedding_rows(const float *table, size_t v, size_t d, const int32_t *ids, size_t rows, float *out) {
    for (size_t r = 0; r < rows; r++) {
        const int32_t id = ids[r];
        float *o = out + r * d;
        if (id >= 0 && (size_t)id < v) {
            memcpy(o, table + (size_t)id * d, d * sizeof(float));
        } else {
            for (size_t j = 0; j < d; j++) o[j] = NAN;
        }
    }
}

CK_DISPATCH void ck_embedding_backward_columns(const float *dout, const int32_t *ids, size_t rows, size_t v,
                                               size_t d, size_t c0, size_t width, float *dtable) {
    for (size_t r = 0; r < rows; r++) {
        const int32_t id = ids[r];
        if (id < 0 || (size_t)id >= v) continue;
        float *restrict t = dtable + (size_t)id * d + c0;
        const float *restrict g = dout + r * d + c0;
        for (size_t j = 0; j < width; j++) t[j] += g[j];
    }
}
