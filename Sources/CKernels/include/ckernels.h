// CKernels: the CPU backend's element-wise and small-tile loops in C, so
// clang's vectoriser turns them into AVX2/AVX-512 code. Each entry point is
// built for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline and
// picked at load time by the CPU it runs on (target_clones / ifunc).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "ckernels_elementwise.h"
#include "ckernels_attention.h"
#include "ckernels_optim.h"
#include "ckernels_rotary.h"
#include "ckernels_embedding.h"
#include "ckernels_parallel.h"
#include "ckernels_signals.h"
int ck_vector_bits(void);
