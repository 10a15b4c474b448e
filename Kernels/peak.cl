// The device's fp32 FMA peak: every work-item runs PEAK_CHAINS independent
// chains of PEAK_WIDTH-wide multiply-adds in registers and stores one float at
// the end, so the kernel is compute-bound on any device (no loads, one store
// per work-item). Each chain does x = x * m + a, which OpenCL C contracts to
// one fused multiply-add (FP_CONTRACT is on by default; written out rather
// than mad() so it needs no builtin library); it stays finite and normal (it
// converges to a / (1 - m)). m, a and the iteration count are arguments, so
// nothing folds at compile time.
// FLOPs per work-item: 2 * PEAK_WIDTH * PEAK_CHAINS * iterations.
//
// PEAK_WIDTH: 1, 2, 4, 8 or 16 (default 8); PEAK_CHAINS: 1 to 16 (default 8).
// CPU devices (PoCL) want the widest vectors their cores have and enough
// chains to cover FMA latency; GPUs scalarise the vectors, so 4 x 4 is plenty
// there alongside many work-items.

#ifndef PEAK_WIDTH
#define PEAK_WIDTH 8
#endif
#ifndef PEAK_CHAINS
#define PEAK_CHAINS 8
#endif

#define PEAK_CAT2(a, b) a##b
#define PEAK_CAT(a, b) PEAK_CAT2(a, b)
#if PEAK_WIDTH == 1
#define vfloat float
#else
#define vfloat PEAK_CAT(float, PEAK_WIDTH)
#endif

// Horizontal sum of one vector.
#if PEAK_WIDTH == 1
#define HSUM(v) (v)
#elif PEAK_WIDTH == 2
#define HSUM(v) ((v).s0 + (v).s1)
#elif PEAK_WIDTH == 4
#define HSUM(v) ((v).s0 + (v).s1 + (v).s2 + (v).s3)
#elif PEAK_WIDTH == 8
#define HSUM(v) ((v).s0 + (v).s1 + (v).s2 + (v).s3 + (v).s4 + (v).s5 + (v).s6 + (v).s7)
#elif PEAK_WIDTH == 16
#define HSUM(v) ((v).s0 + (v).s1 + (v).s2 + (v).s3 + (v).s4 + (v).s5 + (v).s6 + (v).s7 + \
                 (v).s8 + (v).s9 + (v).sa + (v).sb + (v).sc + (v).sd + (v).se + (v).sf)
#else
#error "PEAK_WIDTH must be 1, 2, 4, 8 or 16"
#endif

#if PEAK_CHAINS < 1 || PEAK_CHAINS > 16
#error "PEAK_CHAINS must be 1 to 16"
#endif

// One step of chain j (when the build has that many chains).
#define STEP(j) if (j < PEAK_CHAINS) x##j = x##j * vm + va;

__kernel void fma_peak(__global float *out, const float m, const float a, const int iterations) {
    const int gid = get_global_id(0);
    const vfloat vm = (vfloat)(m), va = (vfloat)(a);
    const float s = (float)(gid & 1023) * 1e-4f;
    vfloat x0 = (vfloat)(s), x1 = x0 + 0.01f, x2 = x0 + 0.02f, x3 = x0 + 0.03f;
    vfloat x4 = x0 + 0.04f, x5 = x0 + 0.05f, x6 = x0 + 0.06f, x7 = x0 + 0.07f;
    vfloat x8 = x0 + 0.08f, x9 = x0 + 0.09f, x10 = x0 + 0.10f, x11 = x0 + 0.11f;
    vfloat x12 = x0 + 0.12f, x13 = x0 + 0.13f, x14 = x0 + 0.14f, x15 = x0 + 0.15f;
    for (int i = 0; i < iterations; i++) {
        STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
        STEP(8) STEP(9) STEP(10) STEP(11) STEP(12) STEP(13) STEP(14) STEP(15)
    }
    // Unused chains keep their start values; adding them costs nothing inside the loop.
    const vfloat sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
                     + ((x8 + x9) + (x10 + x11)) + ((x12 + x13) + (x14 + x15));
    out[gid] = HSUM(sum);
}
