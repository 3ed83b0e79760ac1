/* trace_read.h - the one reader of routing traces (include/moe/trace_format.h, docs/trace.md)
 * that moe_trace, moe_bench --replay and the trace fuzz target share. Every header and record
 * field is checked against the file size and the format's ranges, with overflow-checked sizes;
 * a file cut inside a record or followed by bytes that are not a record is an error. */
#ifndef MOE_TRACE_READ_H
#define MOE_TRACE_READ_H

#include <stddef.h>
#include <stdint.h>

#include "moe/moe.h"
#include "moe/trace_format.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct trace_record {
    moe_trace_record_t r;
    int32_t *idx;     /* (T, W) expert of each entry, distinct within a token, in [0, E) */
    float *gate;      /* (T, W) finite */
    uint8_t *kept;    /* (T, W) 0 or 1 */
    int64_t *counts;  /* (E) >= 0 */
    int64_t *dropped; /* (E) in [0, counts] */
} trace_record_t;

typedef struct trace_file {
    moe_trace_header_t h;
    trace_record_t *rec;
    int64_t n; /* records */
} trace_file_t;

/* Reads and checks the whole file. 0 on success; -1 with a message in err (nothing to free). */
int trace_file_read(const char *path, trace_file_t *t, char *err, size_t err_len);
void trace_file_free(trace_file_t *t);

/* 0 when layer can replay the trace: the same number of experts and routing width
 * (moe_layer_routing_width); -1 with a message otherwise. */
int trace_file_check_layer(const trace_file_t *t, const moe_layer_t *layer, char *err,
                           size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
