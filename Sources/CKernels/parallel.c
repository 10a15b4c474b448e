// A small spin-then-sleep thread pool for the CPU backend's parallel loops.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#include "ckernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

// About 100 microseconds of pause loops before a worker goes to sleep: longer
// than the gap between the ops of a step, short enough not to hold a core for
// long. Every YIELD_EVERY rounds the spinner yields, so on a core shared with
// another busy process (a build, a second job) the thread with real work runs.
#define SPIN_ROUNDS 4096
#define YIELD_EVERY 128

static pthread_once_t once = PTHREAD_ONCE_INIT;
static int32_t threads = 1;
static pthread_mutex_t dispatchLock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sleepLock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static _Atomic uint64_t generation;
// The next part to run, tagged with its job's generation (high 32 bits): a
// worker that woke for an earlier job and runs late can neither claim a part
// of the next job twice nor run it with the old job's function. Claims are a
// compare-and-swap on the tagged value, so a stale claim changes nothing.
static _Atomic uint64_t cursor;
static _Atomic int32_t donePart, sleepers, totalParts;
static void (*job)(void *, int32_t);
static void *jobContext;
static _Thread_local int insidePart;

static void runParts(uint32_t gen) {
    insidePart = 1;
    for (;;) {
        uint64_t c = atomic_load_explicit(&cursor, memory_order_acquire);
        if ((uint32_t)(c >> 32) != gen) break;
        int32_t p = (int32_t)(c & 0xffffffffu);
        if (p >= atomic_load_explicit(&totalParts, memory_order_relaxed)) break;
        if (!atomic_compare_exchange_weak_explicit(&cursor, &c, c + 1, memory_order_acq_rel, memory_order_acquire)) continue;
        // The claim succeeded with this job's tag: job and context are this job's
        // (written before the tagged cursor was released) until donePart says all are done.
        job(jobContext, p);
        atomic_fetch_add_explicit(&donePart, 1, memory_order_release);
    }
    insidePart = 0;
}

static void *worker(void *unused) {
    (void)unused;
    uint64_t seen = atomic_load_explicit(&generation, memory_order_acquire);
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                if (spins % YIELD_EVERY == 0) sched_yield(); else CPU_RELAX();
                continue;
            }
            pthread_mutex_lock(&sleepLock);
            atomic_fetch_add(&sleepers, 1);
            // seq_cst on both sides (here and in ck_parallel_for): either the
            // dispatcher sees this sleeper, or this load sees its new generation.
            while ((g = atomic_load(&generation)) == seen) pthread_cond_wait(&wake, &sleepLock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleepLock);
            break;
        }
        seen = g;
        runParts((uint32_t)g);
    }
    return NULL;
}

static void start(void) {
    long cores = 1;
#ifdef _SC_NPROCESSORS_ONLN
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) cores = CPU_COUNT(&set);
    else cores = sysconf(_SC_NPROCESSORS_ONLN);
#endif
    const char *env = getenv("MOE_GPU_CPU_THREADS");
    if (env && atoi(env) > 0) cores = atoi(env);
    if (cores < 1) cores = 1;
    if (cores > 256) cores = 256;
    threads = (int32_t)cores;
    for (int32_t i = 1; i < threads; i++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, worker, NULL) != 0) { threads = i; pthread_attr_destroy(&attr); break; }
        pthread_attr_destroy(&attr);
    }
}

int32_t ck_parallel_threads(void) {
    pthread_once(&once, start);
    return threads;
}

void ck_parallel_for(int32_t parts, void (*fn)(void *, int32_t), void *ctx) {
    if (parts <= 0) return;
    pthread_once(&once, start);
    if (parts == 1 || threads == 1 || insidePart || pthread_mutex_trylock(&dispatchLock) != 0) {
        for (int32_t p = 0; p < parts; p++) fn(ctx, p);
        return;
    }
    uint32_t gen = (uint32_t)(atomic_load(&generation) + 1);
    job = fn; jobContext = ctx;
    atomic_store_explicit(&totalParts, parts, memory_order_relaxed);
    atomic_store_explicit(&donePart, 0, memory_order_relaxed);
    // Release: a worker that claims a part of this job sees job, context and count.
    atomic_store_explicit(&cursor, (uint64_t)gen << 32, memory_order_release);
    atomic_store(&generation, gen);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleepLock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleepLock);
    }
    runParts(gen);
    for (int spins = 1; atomic_load_explicit(&donePart, memory_order_acquire) < parts; spins++) {
        if (spins % YIELD_EVERY == 0) sched_yield(); else CPU_RELAX();
    }
    pthread_mutex_unlock(&dispatchLock);
}
