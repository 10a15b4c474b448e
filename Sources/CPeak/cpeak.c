// FMA-chain probes: 16 (AVX-512; AVX2 and SSE: 12) independent accumulators, so the
// chains cover FMA latency (4 cycles) times throughput (2 per cycle) with room
// to spare; each accumulator does acc = acc * m + a, which stays finite and
// normal (it converges to a / (1 - m)). No memory traffic in the loop.
#include "cpeak.h"

#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPEAK_X86 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define CPEAK_NEON 1
#include <arm_neon.h>
#endif

// Iterations per timed block: about 20-40 us of work on one core, so the
// clock is read rarely and the duration is still met closely.
#define CPEAK_BLOCK 16384

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Keeps the accumulators' final values observable, so no chain is dead code;
// one per thread (threads run the probe at once: a shared one is a data race).
static _Thread_local volatile float cpeak_sink;
// The multiplier and addend, read at run time so the compiler cannot fold a
// chain (a chain starting at the fixed point a / (1 - m) = 0.1 would be a
// constant to it). Starting values are 1 + j / 8, away from that point.
static volatile float cpeak_m = 0.99999f, cpeak_a = 1e-6f;
#define CPEAK_START(j) (1.0f + 0.125f * (float)(j))

#if CPEAK_X86
#define CHAINS512 16
__attribute__((target("avx512f"))) static double run_avx512(double seconds, double *elapsed) {
    const __m512 m = _mm512_set1_ps(cpeak_m), a = _mm512_set1_ps(cpeak_a);
    __m512 acc[CHAINS512];
    for (int j = 0; j < CHAINS512; j++) acc[j] = _mm512_set1_ps(CPEAK_START(j));
    double start = now_seconds(), t = start;
    long blocks = 0;
    do {
        for (int i = 0; i < CPEAK_BLOCK; i++) {
#pragma clang loop unroll(full)
            for (int j = 0; j < CHAINS512; j++) acc[j] = _mm512_fmadd_ps(acc[j], m, a);
        }
        blocks++;
        t = now_seconds();
    } while (t - start < seconds);
    __m512 s = acc[0];
    for (int j = 1; j < CHAINS512; j++) s = _mm512_add_ps(s, acc[j]);
    cpeak_sink = _mm512_reduce_add_ps(s);
    *elapsed = t - start;
    return (double)blocks * CPEAK_BLOCK * CHAINS512 * 16 * 2;
}

#define CHAINS256 12
__attribute__((target("avx2,fma"))) static double run_avx2(double seconds, double *elapsed) {
    const __m256 m = _mm256_set1_ps(cpeak_m), a = _mm256_set1_ps(cpeak_a);
    __m256 acc[CHAINS256];
    for (int j = 0; j < CHAINS256; j++) acc[j] = _mm256_set1_ps(CPEAK_START(j));
    double start = now_seconds(), t = start;
    long blocks = 0;
    do {
        for (int i = 0; i < CPEAK_BLOCK; i++) {
#pragma clang loop unroll(full)
            for (int j = 0; j < CHAINS256; j++) acc[j] = _mm256_fmadd_ps(acc[j], m, a);
        }
        blocks++;
        t = now_seconds();
    } while (t - start < seconds);
    __m256 s = acc[0];
    for (int j = 1; j < CHAINS256; j++) s = _mm256_add_ps(s, acc[j]);
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float total = 0;
    for (int j = 0; j < 8; j++) total += lanes[j];
    cpeak_sink = total;
    *elapsed = t - start;
    return (double)blocks * CPEAK_BLOCK * CHAINS256 * 8 * 2;
}
#endif

// Portable: 4-lane vectors (SSE2, NEON, ...); `acc * m + a` is contracted to a
// fused multiply-add where the target has one (-ffp-contract=on, the default),
// else a multiply and an add: 2 FLOPs per lane either way. On AArch64 the FMA
// is explicit and accumulates into the chain (acc += m * a: FMLA's form; the
// other form costs a register copy per FMA there): acc grows by m * a per step
// and stops changing once that is under half an ulp, still a normal number.
#if CPEAK_X86
#define CHAINS4 12 // 16 xmm registers without AVX: 12 chains and the two constants
#else
#define CHAINS4 16
#endif
typedef float cpeak_f4 __attribute__((vector_size(16)));
static double run_portable(double seconds, double *elapsed) {
    const float ms = cpeak_m, as = cpeak_a;
    const cpeak_f4 m = {ms, ms, ms, ms}, a = {as, as, as, as};
    cpeak_f4 acc[CHAINS4];
    for (int j = 0; j < CHAINS4; j++) {
        float v = CPEAK_START(j);
        acc[j] = (cpeak_f4){v, v, v, v};
    }
    double start = now_seconds(), t = start;
    long blocks = 0;
    do {
        for (int i = 0; i < CPEAK_BLOCK; i++) {
#pragma clang loop unroll(full)
#if CPEAK_NEON
            for (int j = 0; j < CHAINS4; j++) acc[j] = vfmaq_f32(acc[j], m, a);
#else
            for (int j = 0; j < CHAINS4; j++) acc[j] = acc[j] * m + a;
#endif
        }
        blocks++;
        t = now_seconds();
    } while (t - start < seconds);
    cpeak_f4 s = acc[0];
    for (int j = 1; j < CHAINS4; j++) s += acc[j];
    cpeak_sink = s[0] + s[1] + s[2] + s[3];
    *elapsed = t - start;
    return (double)blocks * CPEAK_BLOCK * CHAINS4 * 4 * 2;
}

int cpeak_supported(cpeak_isa isa) {
    switch (isa) {
    case CPEAK_PORTABLE: return 1;
#if CPEAK_X86
    case CPEAK_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CPEAK_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f");
#endif
    default: return 0;
    }
}

cpeak_isa cpeak_best_isa(void) {
    if (cpeak_supported(CPEAK_AVX512)) return CPEAK_AVX512;
    if (cpeak_supported(CPEAK_AVX2)) return CPEAK_AVX2;
    return CPEAK_PORTABLE;
}

const char *cpeak_isa_name(cpeak_isa isa) {
    switch (isa) {
    case CPEAK_AVX512: return "avx512f";
    case CPEAK_AVX2: return "avx2+fma";
    default: return "portable";
    }
}

int cpeak_lanes(cpeak_isa isa) {
    switch (isa) {
    case CPEAK_AVX512: return 16;
    case CPEAK_AVX2: return 8;
    default: return 4;
    }
}

double cpeak_run(cpeak_isa isa, double seconds, double *elapsed) {
    double ignored = 0;
    if (!elapsed) elapsed = &ignored;
    *elapsed = 0;
    if (!cpeak_supported(isa)) return 0;
    switch (isa) {
#if CPEAK_X86
    case CPEAK_AVX512: return run_avx512(seconds, elapsed);
    case CPEAK_AVX2: return run_avx2(seconds, elapsed);
#endif
    default: return run_portable(seconds, elapsed);
    }
}
