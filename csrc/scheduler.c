/* scheduler.c - the plan of one forward and one backward call: which backend ops and which
 * collectives run, in what order, and where the host waits.
 *
 * Forward on each of P ranks:
 *   gate -> (host) aux-loss sums over ranks -> slot assignment -> permute (expert-major, which
 *   is destination-rank-major) -> [P > 1: exchange per-expert counts, all-to-allv of rows,
 *   regroup [source][expert] -> [expert][source]] -> expert FFNs -> [P > 1: regroup back,
 *   all-to-allv back] -> combine.
 * Backward runs it in reverse. The host reads the per-expert counts after the gate (the expert
 * GEMM sizes and the exchange come from them), so a forward synchronises once per call.
 * With P = 1 the expert side works directly on the permuted buffer: no copies.
 *
 * Determinism: regrouping makes each local expert's rows one contiguous block in a fixed
 * (source rank, position) order, so its weight gradient is one GEMM over a fixed order. */
#define _POSIX_C_SOURCE 199309L

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm/comm.h"
#include "core/status.h"
#include "layer.h"
#include "router/router_host.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* with profiling on: wait for the stream, charge the time since *t0 to phase, restart */
static moe_status_t mark(moe_layer_t *L, moe_phase_t phase, double *t0, void *stream) {
    if (!L->profiling) return MOE_STATUS_SUCCESS;
    MOE_CHECK(L->ctx->ops->sync(L->ctx, stream));
    double t = now_s();
    L->phase_s[phase] = t - *t0;
    *t0 = t;
    return MOE_STATUS_SUCCESS;
}

/* global sums of the per-expert terms and the dropped counts; returns T over all ranks */
static moe_status_t reduce_stats(moe_layer_t *L, int64_t *T_total) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    const int64_t E = s->E;
    *T_total = s->T;
    if (ctx->world == 1) return MOE_STATUS_SUCCESS;
    int64_t n = 5 * E + 2;
    double *buf = (double *)malloc((size_t)n * sizeof(double));
    if (!buf) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "stats reduction buffer");
    for (int64_t e = 0; e < E; ++e) {
        buf[e] = (double)s->counts_h[e];
        buf[E + e] = (double)s->dropped_h[e];
        buf[2 * E + e] = s->prob_sum_h[e];
        buf[3 * E + e] = s->importance_h[e];
        buf[4 * E + e] = s->load_h[e];
    }
    buf[5 * E] = s->z_sum;
    buf[5 * E + 1] = (double)s->T;
    moe_status_t st = moe__comm_allreduce_f64(ctx->comm, buf, n);
    if (st == MOE_STATUS_SUCCESS) {
        for (int64_t e = 0; e < E; ++e) {
            s->counts_h[e] = (int64_t)buf[e];
            s->dropped_h[e] = (int64_t)buf[E + e];
            s->prob_sum_h[e] = buf[2 * E + e];
            s->importance_h[e] = buf[3 * E + e];
            s->load_h[e] = buf[4 * E + e];
        }
        s->z_sum = buf[5 * E];
        *T_total = (int64_t)buf[5 * E + 1];
    }
    free(buf);
    return st;
}

/* the exchange plan from this rank's expert offsets and the peers' counts */
static moe_status_t plan_exchange(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    moe_exchange_t *x = &L->ex;
    const int P = ctx->world;
    const int64_t El = s->E_local;
    for (int64_t e = 0; e < s->E; ++e) x->send_counts[e] = s->offsets_h[e + 1] - s->offsets_h[e];
    MOE_CHECK(moe__comm_alltoall_i64(ctx->comm, x->send_counts, x->recv_counts, El));
    int64_t off = 0;
    for (int q = 0; q < P; ++q) {
        x->send_off[q] = s->offsets_h[q * El];
        x->send_rows[q] = s->offsets_h[(q + 1) * El] - s->offsets_h[q * El];
        int64_t rows = 0;
        for (int64_t le = 0; le < El; ++le) rows += x->recv_counts[q * El + le];
        x->recv_off[q] = off;
        x->recv_rows[q] = rows;
        off += rows;
    }
    x->rows = off;
    /* expert side: local expert le owns rows [ex_offsets[b + le], ex_offsets[b + le + 1]) */
    int64_t b = s->expert_begin, acc = 0;
    for (int64_t le = 0; le < El; ++le) {
        x->ex_offsets[b + le] = acc;
        for (int q = 0; q < P; ++q) acc += x->recv_counts[q * El + le];
    }
    x->ex_offsets[b + El] = acc;
    return MOE_STATUS_SUCCESS;
}

/* copies rows between [source][expert] (received) and [expert][source] (expert side) order;
 * to_expert selects the direction */
static moe_status_t regroup(moe_layer_t *L, float *recv_order, float *expert_order,
                            int to_expert, void *stream) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    moe_exchange_t *x = &L->ex;
    const int64_t El = s->E_local, D = s->D;
    const size_t row = (size_t)D * sizeof(float);
    for (int q = 0; q < ctx->world; ++q) {
        int64_t src = x->recv_off[q];
        for (int64_t le = 0; le < El; ++le) {
            int64_t n = x->recv_counts[q * El + le];
            if (n > 0) {
                /* expert le's block: sources before q come first */
                int64_t dst = x->ex_offsets[s->expert_begin + le];
                for (int p = 0; p < q; ++p) dst += x->recv_counts[p * El + le];
                float *a = recv_order + src * D, *b = expert_order + dst * D;
                MOE_CHECK(ctx->ops->copy(ctx, to_expert ? b : a, to_expert ? a : b,
                                         (size_t)n * row, MOE_COPY_D2D, stream));
            }
            src += n;
        }
    }
    return MOE_STATUS_SUCCESS;
}

/* the state as the expert ops see it with P > 1: expert-side rows and offsets */
static moe_layer_state_t expert_view(moe_layer_t *L) {
    moe_layer_state_t v = L->s;
    if (L->ctx->world > 1) {
        v.xp = L->ex_x;
        v.yp = L->ex_y;
        v.dyp = L->ex_dy;
        v.dxp = L->ex_dx;
        v.offsets_h = L->ex.ex_offsets;
    }
    return v;
}

static moe_status_t exchange(moe_layer_t *L, const float *send, float *recv, int back,
                             void *stream) {
    moe_exchange_t *x = &L->ex;
    const size_t row = (size_t)L->s.D * sizeof(float);
    if (!back)
        return moe__comm_alltoallv_rows(L->ctx->comm, L->ctx, send, x->send_rows, x->send_off,
                                        recv, x->recv_rows, x->recv_off, row, stream);
    return moe__comm_alltoallv_rows(L->ctx->comm, L->ctx, send, x->recv_rows, x->recv_off, recv,
                                    x->send_rows, x->send_off, row, stream);
}

moe_status_t moe__scheduler_forward(moe_layer_t *L, const void *x, void *y, int64_t T,
                                    int training, void *stream) {
    moe_context_t *ctx = L->ctx;
    const moe_backend_ops_t *ops = ctx->ops;
    moe_layer_state_t *s = &L->s;
    const int ep = ctx->world > 1;

    MOE_CHECK(moe__layer_reserve(L, T));
    int64_t bad = 0;
    if (T > 0) MOE_CHECK(ops->count_nonfinite(ctx, x, T * s->D, &bad, stream));
    if (bad)
        return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                       "x holds %lld NaN/Inf values among %lld tokens: nothing was routed",
                       (long long)bad, (long long)T);

    /* from here the previous forward's state is overwritten */
    memset(L->phase_s, 0, sizeof L->phase_s);
    double t0 = now_s();
    s->have_forward = 0;
    s->T = T;
    s->noisy_now = s->cfg.noisy_gating && training;
    s->capacity = moe_router_capacity(s->cfg.capacity_factor, T, s->K, s->E);
    if (T > 0) {
        MOE_CHECK(ops->copy(ctx, s->x, x, (size_t)(T * s->D) * sizeof(float), MOE_COPY_D2D,
                            stream));
        MOE_CHECK(ops->gate_fwd(ctx, s, stream));
    } else {
        for (int64_t e = 0; e < s->E; ++e) {
            s->counts_h[e] = 0;
            s->prob_sum_h[e] = s->importance_h[e] = s->load_h[e] = 0.0;
        }
        s->z_sum = 0.0;
    }
    if (s->noisy_now) s->call++;
    MOE_CHECK(mark(L, MOE_PHASE_GATE, &t0, stream));

    if (T > 0) {
        MOE_CHECK(ops->route(ctx, s, stream));
    } else {
        memset(s->offsets_h, 0, (size_t)(s->E + 1) * sizeof(int64_t));
        memset(s->dropped_h, 0, (size_t)s->E * sizeof(int64_t));
        s->num_rows = 0;
    }
    int64_t T_total = T;
    MOE_CHECK(reduce_stats(L, &T_total));
    MOE_CHECK(moe_router_finalize(s, T_total));
    int64_t dropped = 0;
    for (int64_t e = 0; e < s->E; ++e) dropped += s->dropped_h[e];
    s->stats.num_dropped = dropped;
    MOE_CHECK(mark(L, MOE_PHASE_ROUTE, &t0, stream));

    if (T > 0) MOE_CHECK(ops->permute(ctx, s, stream));
    MOE_CHECK(mark(L, MOE_PHASE_PERMUTE, &t0, stream));

    if (ep) {
        MOE_CHECK(plan_exchange(L));
        MOE_CHECK(moe__layer_reserve_rows(L, L->ex.rows));
        /* ex_dy is free during the forward: it holds the rows in arrival order */
        MOE_CHECK(exchange(L, s->xp, L->ex_dy, 0, stream));
        MOE_CHECK(regroup(L, L->ex_dy, L->ex_x, 1, stream));
        s->stats.rows_sent = s->num_rows;
        s->stats.rows_received = L->ex.rows;
    } else {
        MOE_CHECK(moe__layer_reserve_rows(L, s->num_rows));
        s->stats.rows_sent = s->stats.rows_received = s->num_rows;
    }
    MOE_CHECK(mark(L, MOE_PHASE_DISPATCH, &t0, stream));

    moe_layer_state_t view = expert_view(L);
    MOE_CHECK(ops->ffn_fwd(ctx, &view, stream));
    MOE_CHECK(mark(L, MOE_PHASE_EXPERTS, &t0, stream));

    if (ep) {
        MOE_CHECK(regroup(L, L->ex_dy, L->ex_y, 0, stream));
        MOE_CHECK(exchange(L, L->ex_dy, s->yp, 1, stream));
    }
    MOE_CHECK(mark(L, MOE_PHASE_RETURN, &t0, stream));

    if (T > 0) MOE_CHECK(ops->combine_fwd(ctx, s, y, stream));
    MOE_CHECK(mark(L, MOE_PHASE_COMBINE, &t0, stream));
    s->have_forward = 1;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__scheduler_backward(moe_layer_t *L, const void *dy, void *dx, void *stream) {
    moe_context_t *ctx = L->ctx;
    const moe_backend_ops_t *ops = ctx->ops;
    moe_layer_state_t *s = &L->s;
    const int ep = ctx->world > 1;
    const int64_t T = s->T;
    for (int p = MOE_PHASE_BWD_COMBINE; p < MOE_PHASE_COUNT; ++p) L->phase_s[p] = 0.0;
    double t0 = now_s();

    /* dy is read in full by combine_bwd before dx is first written: dx may alias dy */
    if (T > 0) MOE_CHECK(ops->combine_bwd(ctx, s, dy, stream));
    MOE_CHECK(mark(L, MOE_PHASE_BWD_COMBINE, &t0, stream));

    if (ep) {
        /* ex_dx is free until the expert backward writes it */
        MOE_CHECK(exchange(L, s->dyp, L->ex_dx, 0, stream));
        MOE_CHECK(regroup(L, L->ex_dx, L->ex_dy, 1, stream));
    }
    MOE_CHECK(mark(L, MOE_PHASE_BWD_DISPATCH, &t0, stream));

    moe_layer_state_t view = expert_view(L);
    MOE_CHECK(ops->ffn_bwd(ctx, &view, stream));
    MOE_CHECK(mark(L, MOE_PHASE_BWD_EXPERTS, &t0, stream));

    if (ep) {
        /* ex_y is not read by the backward: it carries the dX rows in arrival order */
        MOE_CHECK(regroup(L, L->ex_y, L->ex_dx, 0, stream));
        MOE_CHECK(exchange(L, L->ex_y, s->dxp, 1, stream));
    }
    MOE_CHECK(mark(L, MOE_PHASE_BWD_RETURN, &t0, stream));

    if (T > 0) MOE_CHECK(ops->unpermute_bwd(ctx, s, dx, stream));
    MOE_CHECK(mark(L, MOE_PHASE_BWD_UNPERMUTE, &t0, stream));
    if (T > 0) MOE_CHECK(ops->gate_bwd(ctx, s, dx, stream));
    MOE_CHECK(mark(L, MOE_PHASE_BWD_GATE, &t0, stream));
    return MOE_STATUS_SUCCESS;
}
