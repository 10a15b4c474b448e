#pragma once
#include <stdint.h>

/// Runs fn(ctx, part) for part in [0, parts) on the calling thread and a
/// persistent pool of (cores - 1) workers, and returns when all are done.
/// Workers spin briefly between calls before they sleep, so the many short
/// parallel loops of a training step do not pay a thread wake-up each (the
/// CPU analogue of a kernel launch). Parts may run on any thread in any order:
/// each must write its own outputs. A call from inside a part, or while
/// another thread holds the pool, runs every part inline.
void ck_parallel_for(int32_t parts, void (*fn)(void *ctx, int32_t part), void *ctx);

/// Threads in the pool, the caller included (the cores this process may use).
int32_t ck_parallel_threads(void);
