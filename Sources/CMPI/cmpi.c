// Open MPI through dlopen: function pointers and the predefined handles
// (MPI_COMM_WORLD is &ompi_mpi_comm_world, ...) looked up by name, as
// Open MPI's mpi.h defines them. No mpi.h is needed to build.
#define _GNU_SOURCE
#include "cmpi.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef void *Handle;
#define MPI_IN_PLACE ((void *)1)
#define MPI_THREAD_FUNNELED 1
#define CHUNK (1 << 28)

static int (*p_init_thread)(int *, char ***, int, int *);
static int (*p_finalize)(void);
static int (*p_comm_rank)(Handle, int *);
static int (*p_comm_size)(Handle, int *);
static int (*p_allreduce)(const void *, void *, int, Handle, Handle, Handle);
static int (*p_bcast)(void *, int, Handle, int, Handle);
static int (*p_allgather)(const void *, int, Handle, void *, int, Handle, Handle);
static int (*p_alltoallv)(const void *, const int *, const int *, Handle, void *, const int *, const int *, Handle, Handle);
static int (*p_barrier)(Handle);
static int (*p_error_string)(int, char *, int *);
static int (*p_set_errhandler)(Handle, Handle);
static int (*p_comm_split)(Handle, int, int, Handle *);
static Handle comm_world, dt_float, dt_double, dt_byte, op_sum, errors_return;
static int rank_ = 0, size_ = 1;

int cmpi_launched(void) {
    return getenv("OMPI_COMM_WORLD_SIZE") != NULL || getenv("PMIX_RANK") != NULL || getenv("PMI_RANK") != NULL;
}

#define LOAD(ptr, name) do { *(void **)&ptr = dlsym(lib, name); if (!ptr) { snprintf(err, errlen, "%s has no %s", path, name); return 1; } } while (0)

int cmpi_init(char *err, size_t errlen) {
    // MOE_GPU_MPI_LIBRARY names another Open MPI build (an HPC module's libmpi.so).
    const char *path = getenv("MOE_GPU_MPI_LIBRARY");
    if (!path || !*path) path = "libmpi.so.40";
    // RTLD_GLOBAL: Open MPI's own plugins resolve libmpi's symbols through it.
    void *lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!lib) { snprintf(err, errlen, "cannot load %s (%s)", path, dlerror()); return 1; }
    LOAD(p_init_thread, "MPI_Init_thread"); LOAD(p_finalize, "MPI_Finalize");
    LOAD(p_comm_rank, "MPI_Comm_rank"); LOAD(p_comm_size, "MPI_Comm_size");
    LOAD(p_allreduce, "MPI_Allreduce"); LOAD(p_bcast, "MPI_Bcast"); LOAD(p_allgather, "MPI_Allgather");
    LOAD(p_alltoallv, "MPI_Alltoallv"); LOAD(p_barrier, "MPI_Barrier");
    LOAD(p_error_string, "MPI_Error_string"); LOAD(p_set_errhandler, "MPI_Comm_set_errhandler");
    LOAD(p_comm_split, "MPI_Comm_split");
    LOAD(comm_world, "ompi_mpi_comm_world"); LOAD(dt_float, "ompi_mpi_float"); LOAD(dt_double, "ompi_mpi_double");
    LOAD(dt_byte, "ompi_mpi_byte"); LOAD(op_sum, "ompi_mpi_op_sum");
    LOAD(errors_return, "ompi_mpi_errors_return");
    int provided = 0;
    int rc = p_init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    if (rc) { snprintf(err, errlen, "MPI_Init_thread failed (%d)", rc); return rc; }
    // Errors come back as codes (and become Swift errors) instead of aborting every rank.
    p_set_errhandler(comm_world, errors_return);
    p_comm_rank(comm_world, &rank_);
    p_comm_size(comm_world, &size_);
    return 0;
}

int cmpi_finalize(void) { return p_finalize ? p_finalize() : 0; }
int cmpi_rank(void) { return rank_; }
int cmpi_size(void) { return size_; }
int cmpi_local_rank(void) {
    const char *s = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!s) s = getenv("SLURM_LOCALID");
    return s ? atoi(s) : 0;
}

// --- watchdog ---------------------------------------------------------------
static pthread_mutex_t wd_lock = PTHREAD_MUTEX_INITIALIZER;
static double wd_timeout = 0, wd_started = 0;
static const char *wd_what = NULL;
static int wd_running = 0;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static void *watchdog(void *unused) {
    (void)unused;
    for (;;) {
        usleep(200 * 1000);
        pthread_mutex_lock(&wd_lock);
        double started = wd_started, timeout = wd_timeout;
        const char *what = wd_what;
        pthread_mutex_unlock(&wd_lock);
        if (what && timeout > 0 && now() - started > timeout) {
            fprintf(stderr, "Error: rank %d of %d: %s has waited %.0f s for the other ranks (--comm-timeout): "
                    "a rank died, stopped or hangs; the last complete checkpoint resumes the run\n", rank_, size_, what, timeout);
            fflush(stderr);
            _exit(1);
        }
    }
    return NULL;
}

void cmpi_set_timeout(double seconds) {
    pthread_mutex_lock(&wd_lock);
    wd_timeout = seconds;
    int start = seconds > 0 && !wd_running;
    if (start) wd_running = 1;
    pthread_mutex_unlock(&wd_lock);
    if (start) {
        pthread_t t;
        pthread_create(&t, NULL, watchdog, NULL);
        pthread_detach(t);
    }
}

static void begin(const char *what) { pthread_mutex_lock(&wd_lock); wd_what = what; wd_started = now(); pthread_mutex_unlock(&wd_lock); }
static int end(int rc) { pthread_mutex_lock(&wd_lock); wd_what = NULL; pthread_mutex_unlock(&wd_lock); return rc; }

// --- collectives --------------------------------------------------------------
#define COMM(c) ((c) ? (Handle)(c) : comm_world)

static int allreduce(void *comm, void *buf, size_t count, size_t elem, Handle type, Handle op, const char *what) {
    begin(what);
    for (size_t done = 0; done < count; done += CHUNK) {
        size_t n = count - done < CHUNK ? count - done : CHUNK;
        int rc = p_allreduce(MPI_IN_PLACE, (char *)buf + done * elem, (int)n, type, op, COMM(comm));
        if (rc) return end(rc);
    }
    return end(0);
}

int cmpi_allreduce_sum_f32(void *comm, float *buf, size_t count) { return allreduce(comm, buf, count, 4, dt_float, op_sum, "an allreduce"); }
int cmpi_allreduce_sum_f64(void *comm, double *buf, size_t count) { return allreduce(comm, buf, count, 8, dt_double, op_sum, "an allreduce"); }

int cmpi_broadcast(void *comm, void *buf, size_t bytes, int root) {
    begin("a broadcast");
    for (size_t done = 0; done < bytes; done += CHUNK) {
        size_t n = bytes - done < CHUNK ? bytes - done : CHUNK;
        int rc = p_bcast((char *)buf + done, (int)n, dt_byte, root, COMM(comm));
        if (rc) return end(rc);
    }
    return end(0);
}

int cmpi_allgather(void *comm, const void *in, void *out, size_t bytes) {
    begin("an allgather");
    return end(p_allgather(in, (int)bytes, dt_byte, out, (int)bytes, dt_byte, COMM(comm)));
}

int cmpi_alltoallv(void *comm, const void *send, const int *sendCounts, const int *sendOffsets,
                   void *recv, const int *recvCounts, const int *recvOffsets) {
    begin("an all-to-all");
    return end(p_alltoallv(send, sendCounts, sendOffsets, dt_byte, recv, recvCounts, recvOffsets, dt_byte, COMM(comm)));
}

int cmpi_barrier(void *comm) { begin("a barrier"); return end(p_barrier(COMM(comm))); }

void *cmpi_split(void *comm, int color, int key, int *rank, int *size) {
    Handle group = NULL;
    if (p_comm_split(COMM(comm), color, key, &group) != 0 || !group) return NULL;
    p_set_errhandler(group, errors_return);
    p_comm_rank(group, rank);
    p_comm_size(group, size);
    return group;
}

void cmpi_error(int code, char *out, size_t len) {
    int n = (int)len;
    if (p_error_string && p_error_string(code, out, &n) == 0) return;
    snprintf(out, len, "MPI error %d", code);
}
