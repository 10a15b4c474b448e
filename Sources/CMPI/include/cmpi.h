// MPI for moe-gpu, loaded at run time: the binary needs no MPI to build or to
// run alone; `mpirun -np N moe-gpu ...` loads Open MPI's libmpi.so.40 (Debian:
// openmpi-bin, libopenmpi3) with dlopen. Every call returns 0 or an error code;
// cmpi_error gives its text. Counts above 2^28 elements are split into chunks.
#pragma once
#include <stddef.h>

// Whether this process was started by an MPI launcher (mpirun, srun with PMIx).
int cmpi_launched(void);
// Loads libmpi and calls MPI_Init_thread; errors go to `err`. 0 on success.
int cmpi_init(char *err, size_t errlen);
int cmpi_finalize(void);
int cmpi_rank(void);
int cmpi_size(void);
// Ranks on this host (Open MPI's local rank), for picking a device per rank.
int cmpi_local_rank(void);

// Collectives over `comm`: NULL for every rank (MPI_COMM_WORLD), or a group from cmpi_split.
// In-place sums over the ranks (every rank gets the result).
int cmpi_allreduce_sum_f32(void *comm, float *buf, size_t count);
int cmpi_allreduce_sum_f64(void *comm, double *buf, size_t count);
int cmpi_broadcast(void *comm, void *buf, size_t bytes, int root);
// Gathers `bytes` from every rank into `out` (size * bytes) on every rank.
int cmpi_allgather(void *comm, const void *in, void *out, size_t bytes);
// Sends sendCounts[r] bytes at sendOffsets[r] to rank r, receives likewise.
int cmpi_alltoallv(void *comm, const void *send, const int *sendCounts, const int *sendOffsets,
                   void *recv, const int *recvCounts, const int *recvOffsets);
int cmpi_barrier(void *comm);
// The ranks of `comm` with the same `color`, ordered by `key` (MPI_Comm_split); NULL on failure.
void *cmpi_split(void *comm, int color, int key, int *rank, int *size);
void cmpi_error(int code, char *out, size_t len);

// The watchdog: a collective that has not returned after `seconds` prints
// `what` with this rank and exits the process with status 1 (a rank died or
// stopped; its peers would wait for ever). 0 disables it.
void cmpi_set_timeout(double seconds);
