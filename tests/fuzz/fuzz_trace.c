/* fuzz_trace.c - libFuzzer target for the trace reader that moe_trace and moe_bench --replay
 * share (bench/trace_read.c): the bytes become a file, the reader reads it. What must hold for
 * any input: no crash, leak, hang or sanitizer report; a failed read says why and hands out
 * nothing; a successful read holds only what the format allows (checked again here). */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trace_read.h"

static void check_read(const trace_file_t *t) {
    const int64_t E = t->h.num_experts, W = t->h.routing_width;
    if (E < 1 || W < 1 || W > E) abort();
    for (int64_t i = 0; i < t->n; ++i) {
        const trace_record_t *r = &t->rec[i];
        if (r->r.width != W || r->r.num_tokens < 0) abort();
        for (int64_t k = 0; k < r->r.num_tokens * W; ++k)
            if (r->idx[k] < 0 || r->idx[k] >= E || !isfinite(r->gate[k]) || r->kept[k] > 1)
                abort();
        for (int64_t e = 0; e < E; ++e)
            if (r->counts[e] < 0 || r->dropped[e] > r->counts[e]) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char path[64];
    /* a memory file system where there is one: on a disk each input's write waits for it */
    if (!path[0])
        snprintf(path, sizeof path, "%s/moe_fuzz_trace.%d",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
    trace_file_t t;
    char err[512] = "";
    int rc = trace_file_read(path, &t, err, sizeof err);
    unlink(path);
    if (rc == 0) {
        check_read(&t);
        trace_file_free(&t);
    } else if (err[0] == '\0' || t.rec != NULL || t.n != 0) {
        abort();
    }
    return 0;
}
