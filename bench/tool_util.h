/* tool_util.h - what moe_bench, moe_trace and the examples share: mpirun detection, memory on
 * the benchmarked backend (host for CPU, device for CUDA), dtype conversion of host arrays and
 * the names of the config's enumerations. Built once as the static library moe_tool_util.
 *
 * Timing is csrc/core/clock.h (moe_now_s), element sizes and the f16/bf16 conversions are
 * csrc/core/dtype.h: header-only core files that the tools include directly. */
#ifndef MOE_TOOL_UTIL_H
#define MOE_TOOL_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "moe/moe.h"

/* ---- processes ------------------------------------------------------------------------------ */

/* 1 when started by mpirun / srun (OpenMPI, MPICH or PMIx environment), else 0 */
int tool_under_mpi(void);

/* the node-local rank the launcher exported, or -1 when it exported none */
int tool_local_rank(void);

/* ---- memory on the backend ------------------------------------------------------------------ */

typedef struct tool_mem {
    int gpu; /* 1: device memory through the CUDA runtime (builds with CUDA only) */
} tool_mem_t;

typedef enum tool_copy {
    TOOL_COPY_TO_BACKEND = 0, /* host -> backend memory */
    TOOL_COPY_TO_HOST = 1,    /* backend memory -> host */
    TOOL_COPY_WITHIN = 2      /* backend memory -> backend memory */
} tool_copy_t;

/* bytes (at least 1) of backend memory, NULL when there is none */
void *tool_mem_alloc(const tool_mem_t *m, size_t bytes);
/* NULL is accepted */
void tool_mem_free(const tool_mem_t *m, void *p);
/* complete on return; 0 on success */
int tool_mem_copy(const tool_mem_t *m, void *dst, const void *src, size_t bytes, tool_copy_t kind);
/* waits for the device; 0 on success */
int tool_mem_sync(const tool_mem_t *m);

/* ---- dtype conversion ----------------------------------------------------------------------- */

/* n f32 host values -> storage of dtype t (host), round to nearest even */
void tool_to_dtype(moe_dtype_t t, const float *src, void *dst, int64_t n);
/* n host values of dtype t -> f32 */
void tool_from_dtype(moe_dtype_t t, const void *src, float *dst, int64_t n);
/* rounds n f32 host values to dtype t and back in place: what a layer of dtype t sees */
int tool_round_to_dtype(moe_dtype_t t, float *v, int64_t n);
/* a backend array of n elements of dtype t -> a malloc'd f32 host array, NULL on failure */
float *tool_fetch_f32(const tool_mem_t *m, moe_dtype_t t, const void *src, int64_t n);

/* ---- names of the config's enumerations (their values index these tables) ------------------- */

extern const char *const tool_activation_names[4]; /* relu gelu silu swiglu */
extern const char *const tool_gate_names[2];       /* softmax-of-topk topk-of-softmax */
extern const char *const tool_priority_names[2];   /* position score */

/* ---- placement files (placement_file.c; format in docs/expert-parallel.md) ---------------- */

typedef struct tool_placement {
    int64_t num_experts;
    int ranks;
    int64_t *num_local; /* (ranks) */
    int32_t *experts;   /* (sum num_local), rank after rank */
} tool_placement_t;

/* 0 on success, -1 with a message on stderr (free with tool_placement_free either way) */
int tool_placement_read(const char *path, tool_placement_t *pl);
void tool_placement_free(tool_placement_t *pl);
/* 0 on success */
int tool_placement_write(FILE *f, int64_t num_experts, int ranks, const int64_t *num_local,
                         const int32_t *experts);

#endif /* MOE_TOOL_UTIL_H */
