#include "ckernels.h"

// The vector width the CK_DISPATCH kernels run at on this CPU: 512, 256 or 128
// bits, from the same CPU tests the loader's dispatch uses (for reports and tests).
int ck_vector_bits(void) {
#if defined(__x86_64__) && defined(__linux__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 512;
    if (__builtin_cpu_supports("x86-64-v3")) return 256;
#endif
    return 128;
}
