// FMA-chain probes of the CPU's floating-point peak (fp32), one per vector
// width, chosen at run time. Each call keeps one core busy; the Swift side
// runs one call per core at once and adds up the FLOPs.
#ifndef CPEAK_H
#define CPEAK_H

#ifdef __cplusplus
extern "C" {
#endif

/// The probes. CPEAK_AVX512 and CPEAK_AVX2 exist only on x86; CPEAK_PORTABLE
/// (4-lane vectors, a fused multiply-add where the target has one) everywhere.
typedef enum {
    CPEAK_PORTABLE = 0,
    CPEAK_AVX2 = 1,
    CPEAK_AVX512 = 2,
} cpeak_isa;

/// The widest probe this CPU (and OS) runs, per __builtin_cpu_supports.
cpeak_isa cpeak_best_isa(void);

/// Whether this CPU runs `isa`.
int cpeak_supported(cpeak_isa isa);

/// "avx512f", "avx2+fma" or "portable".
const char *cpeak_isa_name(cpeak_isa isa);

/// fp32 lanes per vector of `isa` (16, 8, 4).
int cpeak_lanes(cpeak_isa isa);

/// Runs independent FMA chains of `isa` on the calling thread for about
/// `seconds` (at least one block), and returns the FLOPs done (2 per lane per
/// FMA); `*elapsed` receives the seconds it ran. Returns 0 when `isa` is not
/// supported here.
double cpeak_run(cpeak_isa isa, double seconds, double *elapsed);

#ifdef __cplusplus
}
#endif

#endif
