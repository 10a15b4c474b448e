// Build every kernel for AVX-512, AVX2+FMA and the baseline; the loader picks
// the widest the CPU has (GNU ifunc). Elsewhere (non-x86), one plain version.
#pragma once
#if defined(__x86_64__) && defined(__linux__)
#define CK_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CK_DISPATCH
#endif
