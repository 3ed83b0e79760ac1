/* layer.h - the layer handle (internal): owner of parameters, gradients and buffers. */
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include "backend/backend.h"
#include "core/status.h"

#ifdef __cplusplus
extern "C" {
#endif

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

moe_status_t moe__trace_write(moe_layer_t *layer);
moe_status_t moe__apply_forced_routing(moe_layer_t *layer, void *stream);

/* argument check at the entry of a public moe_layer_* call */
#define MOE_LAYER_ARG(layer)                                                                  \
    MOE_ARG((layer) != NULL && (layer)->magic == MOE_LAYER_MAGIC, "layer is %s",              \
            (layer) == NULL ? "NULL" : "not a live moe_layer_t")

/* grows the per-token buffers to hold T tokens; on failure the layer is unchanged */
moe_status_t moe__layer_reserve(moe_layer_t *layer, int64_t T);
/* grows the expert-side buffers to hold `rows` rows */
moe_status_t moe__layer_reserve_rows(moe_layer_t *layer, int64_t rows);

/* the plan of one forward / backward call (scheduler.c) */
moe_status_t moe__scheduler_forward(moe_layer_t *layer, const void *x, void *y, int64_t T,
                                    int training, void *stream);
moe_status_t moe__scheduler_backward(moe_layer_t *layer, const void *dy, void *dx, void *stream);

#ifdef __cplusplus
}
#endif

#endif
