/* scheduler.c - the plan of one forward and one backward call: which backend ops and which
 * collectives run, in what order, and where the host waits.
 *
 * Forward on each of P ranks:
 *   gate -> (host) aux-loss sums over ranks -> slot assignment -> permute (expert-major, which
 *   is destination-rank-major) -> [P > 1: exchange per-expert counts, all-to-allv of rows,
 *   regroup [source][expert] -> [expert][source]] -> expert FFNs -> [P > 1: regroup back,
 *   all-to-allv back] -> combine.
 * Backward runs it in reverse. The host reads the per-expert counts after the gate (the expert
 * GEMM sizes and the exchange come from them), so a forward synchronises once for the routing,
 * besides the NaN/Inf check of x; with P > 1 the CUDA backend also waits before each chunk's
 * expert ops (it uploads the chunk's row offsets).
 * With P = 1 the expert side works directly on the permuted buffer: no copies.
 *
 * Determinism: regrouping makes each local expert's rows one contiguous block in a fixed
 * (source rank, position) order, so its weight gradient is one GEMM over a fixed order. */
#define _POSIX_C_SOURCE 199309L

#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "buffers.h"
#include "collective.h"
#include "comm/comm.h"
#include "core/clock.h"
#include "core/dtype.h"
#include "core/status.h"
#include "handle.h"
#include "router/hier.h"
#include "numerics.h"
#include "placement.h"
#include "router/router_host.h"
#include "scheduler.h"
#include "scheduler_ops.h"
#include "trace.h"

/* with profiling on: wait for the stream, add the time since *t0 to phase, restart */
static moe_status_t mark(moe_layer_t *L, moe_phase_t phase, double *t0, void *stream) {
    if (!L->profiling) return MOE_STATUS_SUCCESS;
    MOE_CHECK(L->ctx->ops->mem.sync(L->ctx, stream));
    double t = moe_now_s();
    L->phase_s[phase] += t - *t0;
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
    if (st == MOE_STATUS_SUCCESS && s->G) /* hierarchical gating's per-group sums */
        st = moe__comm_allreduce_f64(ctx->comm, s->hier_sums_h, MOE_HIER_NSUMS(s->G, E));
    return st;
}

/* Loss-free balancing: after a training forward, every expert's selection bias moves by the
 * update rate towards the mean load (global counts, so every rank applies the same update). */
static moe_status_t update_score_bias(moe_layer_t *L, void *stream) {
    moe_layer_state_t *s = &L->s;
    double mean = 0.0;
    for (int64_t e = 0; e < s->E; ++e) mean += (double)s->counts_h[e];
    mean /= (double)s->E;
    const float rate = (float)s->cfg.bias_update_rate;
    if (!L->avail_all) {
        /* an unavailable expert keeps its bias; the mean is over the available ones */
        mean = 0.0;
        for (int64_t e = 0; e < s->E; ++e) mean += L->avail_h[e] ? (double)s->counts_h[e] : 0.0;
        mean /= (double)L->num_available;
    }
    for (int64_t e = 0; e < s->E; ++e) {
        if (!L->avail_h[e]) continue;
        double c = (double)s->counts_h[e];
        L->score_bias_h[e] += c < mean ? rate : (c > mean ? -rate : 0.0f);
    }
    return L->ctx->ops->mem.copy(L->ctx, s->score_bias, L->score_bias_h,
                                 (size_t)s->E * sizeof(float), MOE_COPY_H2D, stream);
}

/* Expert availability of this forward (routing extensions): the user's mask and, in training
 * with expert_dropout, the draw keyed by the count of earlier training forwards. Identical on
 * every rank (the mask is collective, the draw does not depend on the rank). */
static moe_status_t expert_availability(moe_layer_t *L, int training, void *stream) {
    moe_layer_state_t *s = &L->s;
    const double p = training ? s->cfg.expert_dropout : 0.0;
    L->num_available = moe_router_availability(L->expert_mask_h, s->E, s->K, p, s->cfg.seed,
                                               L->train_calls, L->avail_h);
    if (training) L->train_calls++;
    L->avail_all = L->num_available == s->E;
    if (L->avail_all) return MOE_STATUS_SUCCESS;
    return L->ctx->ops->mem.copy(L->ctx, L->avail_d, L->avail_h, (size_t)s->E, MOE_COPY_H2D,
                                 stream);
}

/* forced routing may not name an expert that avail (E flags) marks unavailable */
static moe_status_t forced_available(const moe_layer_t *L, const uint8_t *avail) {
    for (int64_t i = 0; i < L->forced_T * L->s.K; ++i) {
        int32_t e = L->forced_idx[i];
        if (e >= 0 && e < L->s.E && !avail[e])
            return MOE_ERR(MOE_STATUS_INVALID_ARGUMENT,
                           "forced routing sends token %lld to expert %d, which is unavailable "
                           "in this forward (mask or expert dropout)",
                           (long long)(i / L->s.K), (int)e);
    }
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * the expert side
 * ------------------------------------------------------------------------------------------- */

/* The exchange plan from this rank's route and the peers' counts. The placement (placement.c)
 * says which slots (rank, expert) exist; this rank's kept rows of each expert are split over
 * the expert's replicas (moe__placement_split), giving one piece of rows per slot. Counts go
 * out as (P, E_max) per rank: what this rank sends each slot of each rank; the expert side then
 * knows what each source sends each local slot, and where each local slot's rows start. */
static moe_status_t plan_exchange(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    moe_exchange_t *x = &L->ex;
    const moe_placement_t *pl = &L->pl;
    const int P = ctx->world;
    const int64_t El = s->E_local, Em = pl->E_max;
    moe__placement_split(L, s->offsets_h);
    for (int q = 0; q < P; ++q) {
        int64_t n = pl->rank_begin[q + 1] - pl->rank_begin[q];
        for (int64_t le = 0; le < Em; ++le)
            x->send_counts[q * Em + le] = le < n ? pl->piece_rows[pl->rank_begin[q] + le] : 0;
    }
    MOE_CHECK(moe__comm_alltoall_i64(ctx->comm, x->send_counts, x->recv_counts, Em));
    /* expert side: local slot le owns rows [ex_offsets[le], ex_offsets[le + 1]) */
    int64_t acc = 0;
    for (int64_t le = 0; le < El; ++le) {
        x->ex_offsets[le] = acc;
        for (int q = 0; q < P; ++q) acc += x->recv_counts[q * Em + le];
    }
    x->ex_offsets[El] = acc;
    x->rows = acc;
    return MOE_STATUS_SUCCESS;
}

/* local slots [lo, hi) of rank q in pipeline chunk c (a rank with fewer slots than chunks has
 * empty chunks) */
static void chunk_range_of(const moe_layer_t *L, int q, int64_t c, int64_t *lo, int64_t *hi) {
    int64_t El = L->pl.rank_begin[q + 1] - L->pl.rank_begin[q], n = L->ex.num_chunks;
    *lo = c * El / n;
    *hi = (c + 1) * El / n;
}

static void chunk_range(const moe_layer_t *L, int64_t c, int64_t *lo, int64_t *hi) {
    chunk_range_of(L, L->s.rank, c, lo, hi);
}

/* the four (P) arrays of chunk c's exchange: send rows, send offsets, recv rows, recv offsets.
 * Sources send the pieces of chunk c's slots of each destination: in place from the route's
 * buffer when the placement is contiguous (the pieces of one destination's chunk follow each
 * other there), else from sendp, where every (chunk, destination) gets its pieces packed in
 * slot order. Arrivals are laid out [chunk][source][slot], so every chunk's rows follow the
 * previous chunk's. */
static int64_t *chunk_plan(moe_layer_t *L, int64_t c) {
    return L->ex.chunk_plan + c * 4 * L->ctx->world;
}

static void plan_chunks(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    moe_exchange_t *x = &L->ex;
    const moe_placement_t *pl = &L->pl;
    const int P = L->ctx->world;
    const int64_t Em = pl->E_max;
    int64_t base = 0, packed = 0;
    for (int64_t c = 0; c < x->num_chunks; ++c) {
        int64_t lo, hi, *sr = chunk_plan(L, c), *so = sr + P, *rr = sr + 2 * P, *ro = sr + 3 * P;
        chunk_range(L, c, &lo, &hi);
        for (int q = 0; q < P; ++q) {
            int64_t qlo, qhi;
            chunk_range_of(L, q, c, &qlo, &qhi);
            const int64_t k0 = pl->rank_begin[q];
            sr[q] = 0;
            for (int64_t le = qlo; le < qhi; ++le) sr[q] += pl->piece_rows[k0 + le];
            if (s->pack_rows) {
                so[q] = packed;
                packed += sr[q];
            } else {
                so[q] = qlo < qhi ? pl->piece_off[k0 + qlo] : 0;
            }
            rr[q] = 0;
            for (int64_t le = lo; le < hi; ++le) rr[q] += x->recv_counts[q * Em + le];
            ro[q] = base;
            base += rr[q];
        }
    }
}

/* with a packing placement: copies every piece between the route's buffer and sendp, in the
 * order of plan_chunks (to_send: route -> sendp; else back) */
static moe_status_t pack_rows(moe_layer_t *L, void *route_side, int to_send, void *stream) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    const moe_placement_t *pl = &L->pl;
    const size_t row = (size_t)s->D * moe_dtype_size(s->cfg.dtype);
    int64_t at = 0;
    for (int64_t c = 0; c < L->ex.num_chunks; ++c)
        for (int q = 0; q < ctx->world; ++q) {
            int64_t qlo, qhi;
            chunk_range_of(L, q, c, &qlo, &qhi);
            for (int64_t k = pl->rank_begin[q] + qlo; k < pl->rank_begin[q] + qhi; ++k) {
                int64_t n = pl->piece_rows[k];
                if (n == 0) continue;
                char *a = (char *)route_side + (size_t)pl->piece_off[k] * row;
                char *b = (char *)s->sendp + (size_t)at * row;
                MOE_CHECK(ctx->ops->mem.copy(ctx, to_send ? b : a, to_send ? a : b,
                                             (size_t)n * row, MOE_COPY_D2D, stream));
                at += n;
            }
        }
    return MOE_STATUS_SUCCESS;
}

/* copies chunk c's rows between exchange order [source][slot] (wire) and expert order
 * [slot][source]; to_expert selects the direction */
static moe_status_t regroup(moe_layer_t *L, int64_t c, void *wire, void *expert_side,
                            int to_expert, void *stream) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    moe_exchange_t *x = &L->ex;
    const int P = ctx->world;
    const int64_t Em = L->pl.E_max, D = s->D;
    const size_t row = (size_t)D * moe_dtype_size(s->cfg.dtype);
    int64_t lo, hi;
    chunk_range(L, c, &lo, &hi);
    const int64_t *ro = chunk_plan(L, c) + 3 * P;
    for (int q = 0; q < P; ++q) {
        int64_t src = ro[q];
        for (int64_t le = lo; le < hi; ++le) {
            int64_t n = x->recv_counts[q * Em + le];
            if (n > 0) {
                /* slot le's block: sources before q come first */
                int64_t dst = x->ex_offsets[le];
                for (int p = 0; p < q; ++p) dst += x->recv_counts[p * Em + le];
                char *a = (char *)wire + (size_t)src * row;
                char *b = (char *)expert_side + (size_t)dst * row;
                MOE_CHECK(ctx->ops->mem.copy(ctx, to_expert ? b : a, to_expert ? a : b,
                                             (size_t)n * row, MOE_COPY_D2D, stream));
            }
            src += n;
        }
    }
    return MOE_STATUS_SUCCESS;
}

/* the expert rows of pipeline chunk c with P > 1: the expert side's offsets (indexed by local
 * slot; the backend sees expert_begin 0), with only chunk c's slots non-empty */
static moe_expert_rows_t chunk_rows(moe_layer_t *L, int64_t c) {
    moe_exchange_t *x = &L->ex;
    int64_t lo, hi;
    chunk_range(L, c, &lo, &hi);
    int64_t first = x->ex_offsets[lo], last = x->ex_offsets[hi];
    for (int64_t le = 0; le <= L->s.E_local; ++le) {
        int64_t o = x->ex_offsets[le];
        x->chunk_offsets[le] = o < first ? first : (o > last ? last : o);
    }
    return (moe_expert_rows_t){.offsets = x->chunk_offsets, .route_offsets = 0};
}

/* the experts' rows: the route's permuted buffers with P = 1, the expert side with P > 1 */
typedef struct {
    moe_expert_rows_t rows;
    void *x, *y, *dy, *dx; /* input, output, and their gradients, (N, D) each */
} expert_bufs_t;

static expert_bufs_t route_bufs(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    return (expert_bufs_t){.rows = {.offsets = s->offsets_h, .route_offsets = 1},
                           .x = s->xp,
                           .y = s->yp,
                           .dy = s->dyp,
                           .dx = s->dxp};
}

static moe_status_t ffn_fwd(moe_layer_t *L, const moe_backend_layer_t *bl,
                            const expert_bufs_t *e, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_ffn_fwd_args_t a = {.layer = bl,
                                  .rows = e->rows,
                                  .w1 = s->param[MOE_PARAM_W1],
                                  .b1 = s->param[MOE_PARAM_B1],
                                  .w2 = s->param[MOE_PARAM_W2],
                                  .b2 = s->param[MOE_PARAM_B2],
                                  .x = e->x,
                                  .hpre = s->hpre,
                                  .act = s->act,
                                  .y = e->y};
    return L->ctx->ops->ffn_fwd(L->ctx, &a, stream);
}

static moe_status_t ffn_bwd(moe_layer_t *L, const moe_backend_layer_t *bl,
                            const expert_bufs_t *e, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_ffn_bwd_args_t a = {.layer = bl,
                                  .rows = e->rows,
                                  .w1 = s->param[MOE_PARAM_W1],
                                  .w2 = s->param[MOE_PARAM_W2],
                                  .dw1 = s->grad[MOE_PARAM_W1],
                                  .db1 = s->grad[MOE_PARAM_B1],
                                  .dw2 = s->grad[MOE_PARAM_W2],
                                  .db2 = s->grad[MOE_PARAM_B2],
                                  .x = e->x,
                                  .hpre = s->hpre,
                                  .act = s->act,
                                  .dy = e->dy,
                                  .dact = s->dact,
                                  .dhpre = s->dhpre,
                                  .dx = e->dx};
    return L->ctx->ops->ffn_bwd(L->ctx, &a, stream);
}

/* Rows to the experts and back, in chunks of local experts: chunk c + 1's all-to-all is posted
 * before chunk c's experts compute, so a transport that progressed in the background would
 * overlap the two (none does yet: docs/expert-parallel.md). Every chunk owns its own rows of
 * ex_wire, so an arrival in flight never meets a departure.
 *   forward:  xp -> ex_wire -> ex_x -> ffn -> ex_y -> ex_wire -> yp
 *   backward: dyp -> ex_wire -> ex_dy -> ffn_bwd -> ex_dx -> ex_wire -> dxp
 * Each expert's rows are complete within one chunk, so its GEMMs (and weight gradient) do not
 * depend on the chunk count. */
static moe_status_t expert_pipeline(moe_layer_t *L, const moe_backend_layer_t *bl, int backward,
                                    void *stream, double *t0) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    const int P = ctx->world;
    const size_t row = (size_t)s->D * moe_dtype_size(s->cfg.dtype);
    const int64_t n = L->ex.num_chunks;
    const void *out = backward ? (const void *)s->dyp : (const void *)s->xp;
    void *in_side = backward ? L->ex_dy : L->ex_x;
    void *out_side = backward ? L->ex_dx : L->ex_y;
    void *back = backward ? (void *)s->dxp : (void *)s->yp;
    void *route_back = back;
    if (s->pack_rows) { /* rows leave from and return to sendp (plan_chunks) */
        MOE_CHECK(pack_rows(L, (void *)out, 1, stream));
        out = s->sendp;
        back = s->sendp;
    }
    const moe_phase_t ph_disp = backward ? MOE_PHASE_BWD_DISPATCH : MOE_PHASE_DISPATCH;
    const moe_phase_t ph_exp = backward ? MOE_PHASE_BWD_EXPERTS : MOE_PHASE_EXPERTS;
    const moe_phase_t ph_ret = backward ? MOE_PHASE_BWD_RETURN : MOE_PHASE_RETURN;

    void *disp[MOE_MAX_CHUNKS] = {0}, *ret[MOE_MAX_CHUNKS] = {0};
    moe_status_t st = MOE_STATUS_SUCCESS;
    for (int64_t c = 0; c < n && st == MOE_STATUS_SUCCESS; ++c) {
        const int64_t *sr = chunk_plan(L, c), *so = sr + P, *rr = sr + 2 * P, *ro = sr + 3 * P;
        if (c == 0)
            st = moe__comm_ialltoallv_rows(ctx->comm, &ctx->mem, out, sr, so, L->ex_wire, rr, ro,
                                           row, stream, &disp[0]);
        if (st == MOE_STATUS_SUCCESS) st = moe__comm_wait(ctx->comm, disp[c]);
        disp[c] = NULL;
        if (st == MOE_STATUS_SUCCESS && c + 1 < n) {
            const int64_t *nsr = chunk_plan(L, c + 1);
            st = moe__comm_ialltoallv_rows(ctx->comm, &ctx->mem, out, nsr, nsr + P, L->ex_wire,
                                           nsr + 2 * P, nsr + 3 * P, row, stream, &disp[c + 1]);
        }
        if (st == MOE_STATUS_SUCCESS) st = regroup(L, c, L->ex_wire, in_side, 1, stream);
        if (st == MOE_STATUS_SUCCESS) st = mark(L, ph_disp, t0, stream);
        if (st == MOE_STATUS_SUCCESS) {
            const expert_bufs_t e = {.rows = chunk_rows(L, c),
                                     .x = L->ex_x,
                                     .y = L->ex_y,
                                     .dy = L->ex_dy,
                                     .dx = L->ex_dx};
            st = backward ? ffn_bwd(L, bl, &e, stream) : ffn_fwd(L, bl, &e, stream);
        }
        if (st == MOE_STATUS_SUCCESS) st = mark(L, ph_exp, t0, stream);
        if (st == MOE_STATUS_SUCCESS) st = regroup(L, c, L->ex_wire, out_side, 0, stream);
        /* back: what arrived from rank q returns to it, into its chunk-c rows */
        if (st == MOE_STATUS_SUCCESS)
            st = moe__comm_ialltoallv_rows(ctx->comm, &ctx->mem, L->ex_wire, rr, ro, back, sr, so,
                                           row, stream, &ret[c]);
        if (st == MOE_STATUS_SUCCESS) st = mark(L, ph_ret, t0, stream);
    }
    /* complete whatever is pending, also after a failure: the buffers must stay quiet */
    for (int64_t c = 0; c < n; ++c) {
        moe_status_t w = moe__comm_wait(ctx->comm, disp[c]);
        moe_status_t r = moe__comm_wait(ctx->comm, ret[c]);
        if (st == MOE_STATUS_SUCCESS) st = w != MOE_STATUS_SUCCESS ? w : r;
    }
    if (st == MOE_STATUS_SUCCESS && s->pack_rows) st = pack_rows(L, route_back, 0, stream);
    if (st == MOE_STATUS_SUCCESS) st = mark(L, ph_ret, t0, stream);
    return st;
}

/* The forward's own checks, before its agreement step: forced routing for this T (and for
 * experts available in it), finite x, buffers for T tokens. Nothing of the last forward
 * changes: it stays readable when this fails. */
moe_status_t moe__scheduler_forward_prepare(moe_layer_t *L, const void *x, int64_t T,
                                            int training, void *stream) {
    moe_context_t *ctx = L->ctx;
    const moe_backend_ops_t *ops = ctx->ops;
    moe_layer_state_t *s = &L->s;
    if (L->forced_idx && L->forced_T != T)
        return MOE_ERR(MOE_STATUS_INVALID_ARGUMENT,
                       "forced routing was given for %lld tokens, this forward has %lld",
                       (long long)L->forced_T, (long long)T);
    if (L->forced_idx) {
        /* the availability this forward will draw (expert_availability, the same call), checked
         * now so that the refusal comes before the agreement step */
        uint8_t *avail = (uint8_t *)malloc((size_t)s->E);
        if (!avail) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "availability check");
        const double p = training ? s->cfg.expert_dropout : 0.0;
        int64_t n = moe_router_availability(L->expert_mask_h, s->E, s->K, p, s->cfg.seed,
                                            L->train_calls, avail);
        moe_status_t st = n < s->E ? forced_available(L, avail) : MOE_STATUS_SUCCESS;
        free(avail);
        MOE_CHECK(st);
    }
    int64_t bad = 0;
    if (T > 0 && ops->count_nonfinite_typed)
        MOE_CHECK(ops->count_nonfinite_typed(ctx, x, s->cfg.dtype, T * s->D, &bad, stream));
    else if (T > 0)
        MOE_CHECK(ops->count_nonfinite(ctx, x, T * s->D, &bad, stream));
    if (bad)
        return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                       "x holds %lld NaN/Inf values among %lld tokens: nothing was routed",
                       (long long)bad, (long long)T);
    /* growing replaces the buffers only once every new one is allocated */
    return moe__buffers_reserve_tokens(L, T);
}

/* the forward; with ye (per-expert outputs) the combine is experts_out_fwd instead */
static moe_status_t forward(moe_layer_t *L, const void *x, void *y, void *ye, float *ge,
                            int64_t T, int training, void *stream) {
    moe_context_t *ctx = L->ctx;
    const moe_backend_ops_t *ops = ctx->ops;
    moe_layer_state_t *s = &L->s;
    const int ep = ctx->world > 1;

    const moe_backend_layer_t bl = moe__backend_layer(s);
    /* from here the previous forward's state is overwritten */
    memset(L->phase_s, 0, sizeof L->phase_s);
    double t0 = moe_now_s();
    s->have_forward = 0;
    s->T = T;
    s->noisy_now = s->cfg.noisy_gating && training;
    MOE_CHECK(expert_availability(L, training, stream));
    if (s->cfg.router == MOE_ROUTER_EXPERT_CHOICE) {
        /* each expert takes C = ceil(cf T k / E) tokens, at most all of them */
        double cf = s->cfg.capacity_factor > 0.0 ? s->cfg.capacity_factor : 1.0;
        int64_t C = moe_router_capacity(cf, T, s->cfg.top_k, s->E);
        s->capacity = C < T ? C : T;
    } else {
        s->capacity = moe_router_capacity(s->cfg.capacity_factor, T, s->K, s->E);
    }
    if (T > 0) {
        MOE_CHECK(ops->mem.copy(ctx, s->x, x, (size_t)(T * s->D) * moe_dtype_size(s->cfg.dtype),
                                MOE_COPY_D2D,
                                stream));
        MOE_CHECK(moe__op_gate_fwd(L, &bl, stream));
    } else {
        for (int64_t e = 0; e < s->E; ++e) {
            s->counts_h[e] = 0;
            s->prob_sum_h[e] = s->importance_h[e] = s->load_h[e] = 0.0;
        }
        s->z_sum = 0.0;
        if (s->G) memset(s->hier_sums_h, 0, (size_t)MOE_HIER_NSUMS(s->G, s->E) * sizeof(double));
    }
    L->forced_last = L->forced_idx != NULL;
    if (L->forced_idx) {
        /* its experts' availability was checked by moe__scheduler_forward_prepare */
        moe_status_t fst = T > 0 ? moe__apply_forced_routing(L, stream) : MOE_STATUS_SUCCESS;
        free(L->forced_idx), free(L->forced_gate);
        L->forced_idx = NULL, L->forced_gate = NULL;
        MOE_CHECK(fst);
    }
    MOE_CHECK(mark(L, MOE_PHASE_GATE, &t0, stream));

    if (T > 0) {
        MOE_CHECK(moe__op_route(L, &bl, stream));
    } else {
        memset(s->offsets_h, 0, (size_t)(s->E + 1) * sizeof(int64_t));
        memset(s->dropped_h, 0, (size_t)s->E * sizeof(int64_t));
        s->num_rows = 0;
    }
    int64_t T_total = T;
    MOE_CHECK(reduce_stats(L, &T_total));
    const moe_router_sums_t sums = {.counts = s->counts_h,
                                    .prob_sum = s->prob_sum_h,
                                    .importance = s->importance_h,
                                    .load = s->load_h,
                                    .z_sum = &s->z_sum};
    /* the running per-expert load the placement planner reads (global counts) */
    for (int64_t e = 0; e < s->E; ++e) L->pl.load_acc[e] += (double)s->counts_h[e];
    if (s->G)
        MOE_CHECK(moe_hier_finalize(&s->cfg, s->E, s->G, s->k1, s->k2, s->hier_sums_h,
                                    s->counts_h, T_total, &s->stats, &s->hier_coefs));
    else
        MOE_CHECK(moe_router_finalize(&s->cfg, s->E, s->K, s->noisy_now, &sums, T_total,
                                      &s->stats, &s->coefs));
    if (s->score_bias && training) MOE_CHECK(update_score_bias(L, stream));
    int64_t dropped = 0;
    for (int64_t e = 0; e < s->E; ++e) dropped += s->dropped_h[e];
    s->stats.num_dropped = dropped;
    MOE_CHECK(mark(L, MOE_PHASE_ROUTE, &t0, stream));

    if (T > 0) MOE_CHECK(moe__op_permute(L, &bl, stream));
    MOE_CHECK(mark(L, MOE_PHASE_PERMUTE, &t0, stream));

    if (ep) {
        MOE_CHECK(plan_exchange(L));
        plan_chunks(L);
        MOE_CHECK(moe__buffers_reserve_rows(L, L->ex.rows));
        s->stats.rows_sent = s->num_rows;
        s->stats.rows_received = L->ex.rows;
        MOE_CHECK(expert_pipeline(L, &bl, 0, stream, &t0));
        moe__layer_exchange_done(L); /* what follows is this rank's alone */
    } else {
        MOE_CHECK(moe__buffers_reserve_rows(L, s->num_rows));
        s->stats.rows_sent = s->stats.rows_received = s->num_rows;
        MOE_CHECK(mark(L, MOE_PHASE_DISPATCH, &t0, stream));
        const expert_bufs_t e = route_bufs(L);
        MOE_CHECK(ffn_fwd(L, &bl, &e, stream));
        MOE_CHECK(mark(L, MOE_PHASE_EXPERTS, &t0, stream));
    }

    if (T > 0 && ye) MOE_CHECK(moe__op_experts_out_fwd(L, &bl, ye, ge, stream));
    else if (T > 0) MOE_CHECK(moe__op_combine_fwd(L, &bl, y, stream));
    /* shared experts: on the caller's stream after the combine (they wait for no exchange, but
     * nothing runs them beside it yet); timed as part of the combine */
    if (T > 0 && !ye && s->cfg.num_shared_experts > 0) MOE_CHECK(moe__op_shared_fwd(L, &bl, y, stream));
    MOE_CHECK(mark(L, MOE_PHASE_COMBINE, &t0, stream));
    s->have_forward = 1;
    /* the noise key advances only with a forward that ran to the end: one that failed on the
     * way (ALLOC_FAILED, COMM_ERROR) is retried with the same noise */
    if (s->noisy_now) s->call++;
    /* a forward that ran to the end keeps its state (backward may follow) whatever the checks
     * say; the trace records it before y is checked */
    moe_status_t trace_st = L->trace ? moe__trace_write(L) : MOE_STATUS_SUCCESS;
    /* y, or the per-expert output rows (T, W, D) of moe_layer_forward_experts */
    moe_status_t num_st =
        T == 0 ? MOE_STATUS_SUCCESS
        : ye   ? moe__numerics_check_forward(L, ye, T * s->K * s->D, stream)
               : moe__numerics_check_forward(L, y, T * s->D, stream);
    return trace_st != MOE_STATUS_SUCCESS ? trace_st : num_st;
}

moe_status_t moe__scheduler_forward(moe_layer_t *L, const void *x, void *y, int64_t T,
                                    int training, void *stream) {
    return forward(L, x, y, NULL, NULL, T, training, stream);
}

moe_status_t moe__scheduler_forward_experts(moe_layer_t *L, const void *x, void *ye, float *ge,
                                            int64_t T, int training, void *stream) {
    return forward(L, x, NULL, ye, ge, T, training, stream);
}

/* the backward; with dye (gradients of the per-expert outputs) the combine's backward is
 * experts_out_bwd instead */
static moe_status_t backward(moe_layer_t *L, const void *dy, const void *dye, const float *dge,
                             void *dx, void *stream) {
    moe_context_t *ctx = L->ctx;
    moe_layer_state_t *s = &L->s;
    const int ep = ctx->world > 1;
    const int64_t T = s->T;
    const moe_backend_layer_t bl = moe__backend_layer(s);
    for (int p = MOE_PHASE_BWD_COMBINE; p < MOE_PHASE_COUNT; ++p) L->phase_s[p] = 0.0;
    double t0 = moe_now_s();

    /* dy is read in full by combine_bwd before dx is first written: dx may alias dy */
    if (T > 0 && dye) MOE_CHECK(moe__op_experts_out_bwd(L, &bl, dye, dge, stream));
    else if (T > 0) MOE_CHECK(moe__op_combine_bwd(L, &bl, dy, stream));
    const int shared = T > 0 && !dye && s->cfg.num_shared_experts > 0;
    if (shared) MOE_CHECK(moe__op_shared_combine_bwd(L, &bl, dy, stream));
    MOE_CHECK(mark(L, MOE_PHASE_BWD_COMBINE, &t0, stream));

    if (ep) {
        MOE_CHECK(expert_pipeline(L, &bl, 1, stream, &t0));
        moe__layer_exchange_done(L); /* what follows is this rank's alone */
    } else {
        const expert_bufs_t e = route_bufs(L);
        MOE_CHECK(ffn_bwd(L, &bl, &e, stream));
        MOE_CHECK(mark(L, MOE_PHASE_BWD_EXPERTS, &t0, stream));
    }

    if (T > 0) MOE_CHECK(moe__op_unpermute_bwd(L, &bl, dx, stream));
    MOE_CHECK(mark(L, MOE_PHASE_BWD_UNPERMUTE, &t0, stream));
    /* forced gates are data, not a function of the router: no router gradient */
    if (T > 0 && !L->forced_last) MOE_CHECK(moe__op_gate_bwd(L, &bl, dx, stream));
    /* shared experts' weight gradients and their share of dx; timed with the gate backward */
    if (shared) MOE_CHECK(moe__op_shared_bwd(L, &bl, dx, stream));
    MOE_CHECK(mark(L, MOE_PHASE_BWD_GATE, &t0, stream));
    return moe__numerics_check_backward(L, T > 0 ? dx : NULL, stream);
}

moe_status_t moe__scheduler_backward_prepare(moe_layer_t *L, const void *dy, int experts_out,
                                             void *stream) {
    /* dy, or the gradients of the per-expert output rows (T, W, D) */
    const moe_layer_state_t *s = &L->s;
    return moe__numerics_check_dy(L, dy, experts_out ? s->T * s->K * s->D : s->T * s->D, stream);
}

moe_status_t moe__scheduler_backward(moe_layer_t *L, const void *dy, void *dx, void *stream) {
    return backward(L, dy, NULL, NULL, dx, stream);
}

moe_status_t moe__scheduler_backward_experts(moe_layer_t *L, const void *dye, const float *dge,
                                             void *dx, void *stream) {
    return backward(L, NULL, dye, dge, dx, stream);
}
