#pragma once
#include <stddef.h>
#include <stdint.h>

/// One AdamW step over n elements (torch.optim.AdamW with the bias corrections
/// c1 = 1/(1-beta1^t), c2 = 1/(1-beta2^t) precomputed): elements [0, decayed)
/// get the decoupled weight decay, the rest none.
void ck_adamw(float *p, const float *g, float *m, float *v, size_t n, size_t decayed,
              float lr, float beta1, float beta2, float eps, float weightDecay, float c1, float c2);

/// Sum of squares of x[0..<n] in blocks of 4096 elements, each summed in 16
/// float lanes added in a fixed order, the blocks added in double: the same
/// result on every instruction set and thread count.
double ck_sum_of_squares(const float *x, size_t n);
