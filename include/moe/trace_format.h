/* trace_format.h - the routing-trace file format (public, versioned; docs/trace.md).
 *
 * What moe_layer_trace_open writes: little-endian, a fixed-size header, then one record per
 * forward. Tools outside the library read traces with these structs (bench/moe_trace.c,
 * bench/replay.c). A reader checks magic and version and starts the records at header_bytes;
 * a change of layout increments MOE_TRACE_VERSION. Installed with moe/moe.h. */
#ifndef MOE_TRACE_FORMAT_H
#define MOE_TRACE_FORMAT_H

#include <stdint.h>

#define MOE_TRACE_MAGIC "MOETRACE"
#define MOE_TRACE_VERSION 2u /* 2: router type and routing width in the header */
#define MOE_TRACE_RECORD_MAGIC 0x50455453u /* "STEP" */

typedef struct moe_trace_header {
    char magic[8];         /* "MOETRACE" */
    uint32_t version;      /* MOE_TRACE_VERSION */
    uint32_t header_bytes; /* sizeof(moe_trace_header_t): records start here */
    int64_t num_experts;   /* E */
    int64_t top_k;         /* K */
    int64_t d_model;
    int64_t d_ff;
    int32_t activation;     /* moe_activation_t */
    int32_t gate;           /* moe_gate_t */
    int32_t priority;       /* moe_priority_t */
    int32_t world;          /* ranks of the communicator that wrote it */
    int32_t rank;           /* the writing rank */
    uint32_t layer_id;
    double capacity_factor; /* <= 0 dropless */
    int32_t router;         /* moe_router_type_t */
    int32_t reserved;       /* 0 */
    int64_t routing_width;  /* W: entries per token in every record (top_k, or E for expert
                               choice) */
} moe_trace_header_t;

/* followed by: int32 expert_index[T*W], float gate[T*W], uint8 kept[T*W],
 * int64 tokens_per_expert[E], int64 dropped_per_expert[E] (global over ranks) */
typedef struct moe_trace_record {
    uint32_t magic; /* MOE_TRACE_RECORD_MAGIC */
    uint32_t layer_id;
    int64_t step;       /* forward calls since the trace was opened */
    int64_t num_tokens; /* T of this rank */
    int64_t width;      /* W, the header's routing_width */
} moe_trace_record_t;

#endif
