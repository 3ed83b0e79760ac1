/* placement_file.c - the placement text file of moe_trace plan and moe_bench --placement
 * (format: docs/expert-parallel.md):
 *
 *   # libmoe placement 1
 *   experts 8
 *   ranks 3
 *   rank 0: 0 1 2
 *   rank 1: 0 3 4 5
 *   rank 2: 6 7
 *
 * '#' starts a comment line; every rank line lists that rank's experts (ascending, none for a
 * rank without experts). The library validates the content (moe_layer_set_placement). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tool_util.h"

int tool_placement_write(FILE *f, int64_t E, int P, const int64_t *num_local,
                         const int32_t *experts) {
    fprintf(f, "# libmoe placement 1\nexperts %lld\nranks %d\n", (long long)E, P);
    int64_t at = 0;
    for (int q = 0; q < P; ++q) {
        fprintf(f, "rank %d:", q);
        for (int64_t i = 0; i < num_local[q]; ++i) fprintf(f, " %d", (int)experts[at++]);
        fprintf(f, "\n");
    }
    return ferror(f) ? -1 : 0;
}

int tool_placement_read(const char *path, tool_placement_t *pl) {
    memset(pl, 0, sizeof *pl);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "placement: cannot open %s\n", path);
        return -1;
    }
    char line[1 << 16];
    int next_rank = 0, ok = 1;
    int64_t at = 0;
    while (ok && fgets(line, sizeof line, f)) {
        char *s = line;
        while (*s == ' ' || *s == '\t') ++s;
        if (*s == '#' || *s == '\n' || *s == '\0') continue;
        long long v;
        int q;
        if (sscanf(s, "experts %lld", &v) == 1) {
            pl->num_experts = v;
        } else if (sscanf(s, "ranks %d", &q) == 1 && q >= 1 && !pl->num_local) {
            pl->ranks = q;
            pl->num_local = calloc((size_t)q, sizeof(int64_t));
            pl->experts = NULL;
            ok = pl->num_local != NULL && pl->num_experts >= 1;
        } else if (sscanf(s, "rank %d:", &q) == 1 && pl->num_local && q == next_rank &&
                   q < pl->ranks) {
            char *p = strchr(s, ':') + 1;
            for (;;) {
                char *end;
                long e = strtol(p, &end, 10);
                if (end == p) break;
                int32_t *grown = realloc(pl->experts, (size_t)(at + 1) * sizeof(int32_t));
                if (!grown) {
                    ok = 0;
                    break;
                }
                pl->experts = grown;
                pl->experts[at++] = (int32_t)e;
                pl->num_local[q]++;
                p = end;
            }
            next_rank++;
        } else {
            ok = 0;
        }
    }
    fclose(f);
    if (!ok || !pl->num_local || next_rank != pl->ranks) {
        fprintf(stderr,
                "placement: %s is not a placement file (expected 'experts E', 'ranks P', then "
                "'rank q: ...' for q = 0 .. P-1 in order)\n",
                path);
        tool_placement_free(pl);
        return -1;
    }
    if (!pl->experts) pl->experts = calloc(1, sizeof(int32_t));
    return pl->experts ? 0 : -1;
}

void tool_placement_free(tool_placement_t *pl) {
    free(pl->num_local), free(pl->experts);
    memset(pl, 0, sizeof *pl);
}
