#include <math.h>
#include "ckernels.h"
#include "dispatch.h"

CK_DISPATCH void ck_adamw(float *p, const float *g, float *m, float *v, size_t n, size_t decayed,
                          float lr, float beta1, float beta2, float eps, float weightDecay, float c1, float c2) {
    const float decay = 1.0f - lr * weightDecay;
    if (decayed > n) decayed = n;
    // Two loops instead of a per-element branch, so both vectorise.
    for (size_t i = 0; i < decayed; i++) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi; v[i] = vi;
        p[i] = p[i] * decay - lr * (mi * c1) / (sqrtf(vi * c2) + eps);
    }
    for (size_t i = decayed; i < n; i++) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi; v[i] = vi;
        p[i] = p[i] - lr * (mi * c1) / (sqrtf(vi * c2) + eps);
    }
}

CK_DISPATCH double ck_sum_of_squares(const float *x, size_t n) {
    double total = 0;
    for (size_t start = 0; start < n; start += 4096) {
        const size_t end = start + 4096 < n ? start + 4096 : n;
        float lane[16] = {0};
        size_t i = start;
        for (; i + 16 <= end; i += 16)
            for (int l = 0; l < 16; l++) lane[l] += x[i + l] * x[i + l];
        for (int l = 0; i < end; i++, l++) lane[l] += x[i] * x[i];
        float s = 0;
        for (int l = 0; l < 16; l++) s += lane[l];
        total += (double)s;
    }
    return total;
}
