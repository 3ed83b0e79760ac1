/* handle.h - the layer handle (internal): what one moe_layer_t holds. The layer (layer.c) owns
 * it; the scheduler, buffers and traces work on it. Nothing here calls anything. */
#ifndef MOE_HANDLE_H
#define MOE_HANDLE_H

#include <stdint.h>

#include "context.h"
#include "core/status.h"
#include "moe/moe.h"
#include "state.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_LAYER_MAGIC 0x4D4F454Cu /* "MOEL" */

/* the exchange plan of one forward with expert parallelism (host arrays) */
typedef struct moe_exchange {
    int64_t *send_counts; /* (E) kept rows this rank sends to each global expert */
    int64_t *recv_counts; /* (P, E_local) rows each source rank sends to each local expert */
    int64_t *ex_offsets;           /* (E + 1) expert-side rows: entries of the local experts */
    int64_t rows;                  /* rows this rank's experts received */
    int64_t num_chunks;            /* pipeline chunks of local experts */
    int64_t *chunk_plan;           /* (MOE_MAX_CHUNKS, 4, P) send rows/off, recv rows/off */
    int64_t *chunk_offsets;        /* (E + 1) expert-side offsets of one chunk's experts */
} moe_exchange_t;

struct moe_layer {
    uint32_t magic;
    moe_context_t *ctx;
    moe_layer_state_t s;

    /* expert side: rows the local experts process (P > 1: received and regrouped) */
    int64_t cap_rows;
    float *ex_x, *ex_y, *ex_dy, *ex_dx; /* (rows, D), only when P > 1 */
    moe_exchange_t ex;

    float *score_bias_h; /* (E) host mirror of s.score_bias (loss-free balancing) */

    int profiling;
    double phase_s[MOE_PHASE_COUNT];

    /* routing trace (trace.c) */
    void *trace; /* FILE * */
    uint32_t trace_layer_id;
    int64_t trace_step;
    /* forced routing for the next forward, host (forced_T, K); forced_last: the last forward
     * used one (its backward gives the router no gradient) */
    int32_t *forced_idx;
    float *forced_gate;
    int64_t forced_T;
    int forced_last;
};

/* argument check at the entry of a public moe_layer_* call */
#define MOE_LAYER_ARG(layer)                                                                  \
    MOE_ARG((layer) != NULL && (layer)->magic == MOE_LAYER_MAGIC, "layer is %s",              \
            (layer) == NULL ? "NULL" : "not a live moe_layer_t")

#ifdef __cplusplus
}
#endif

#endif
