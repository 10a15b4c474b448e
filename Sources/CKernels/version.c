#include "ckernels.h"
#include "dispatch.h"

// Which clone the loader picked: 512, 256 or 128 (vector bits), for reports.
CK_DISPATCH int ck_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 128;
#endif
}
