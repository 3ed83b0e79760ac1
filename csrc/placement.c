/* placement.c - which rank holds which experts: validation and the tables of a placement, the
 * default contiguous split, the split of a source's rows over an expert's replicas, moving the
 * experts' parameters, gradients and optimizer moments when the placement changes, the sum of
 * the replicas' gradients, and the running per-expert load the planner reads.
 *
 * Expert state moves and replica gradients are summed with the communicator's row all-to-all
 * only, in orders fixed by the placement, so every rank computes the same thing. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "buffers.h"
#include "collective.h"
#include "comm/comm.h"
#include "core/dtype.h"
#include "core/status.h"
#include "handle.h"
#include "optim.h"
#include "placement.h"

/* ---------------------------------------------------------------------------------------------
 * tables
 * ------------------------------------------------------------------------------------------- */

void moe__placement_free(moe_placement_t *pl) {
    free(pl->rank_begin), free(pl->slot_expert), free(pl->slot_rank), free(pl->rep_begin);
    free(pl->rep_slot), free(pl->piece_off), free(pl->piece_rows);
    pl->rank_begin = NULL, pl->rep_begin = NULL, pl->rep_slot = NULL, pl->piece_off = NULL;
    pl->slot_expert = NULL, pl->slot_rank = NULL, pl->piece_rows = NULL;
}

/* validates (num_local (P), experts (sum num_local)) and fills *pl; nothing is kept on failure */
static moe_status_t build(moe_placement_t *pl, int P, int64_t E, const int64_t *num_local,
                          const int32_t *experts) {
    memset(pl, 0, sizeof *pl);
    int64_t S = 0;
    for (int q = 0; q < P; ++q) {
        MOE_ARG(num_local[q] >= 0 && num_local[q] <= E,
                "placement: num_local[%d] = %lld is not in [0, num_experts = %lld]", q,
                (long long)num_local[q], (long long)E);
        S += num_local[q];
    }
    int64_t at = 0;
    for (int q = 0; q < P; ++q)
        for (int64_t i = 0; i < num_local[q]; ++i, ++at) {
            MOE_ARG(experts[at] >= 0 && experts[at] < E,
                    "placement: experts[%lld] (rank %d) = %d is not an expert id in [0, %lld)",
                    (long long)at, q, (int)experts[at], (long long)E);
            MOE_ARG(i == 0 || experts[at] > experts[at - 1],
                    "placement: rank %d lists expert %d after expert %d (each rank's experts must "
                    "ascend, without repeats)",
                    q, (int)experts[at], (int)experts[at - 1]);
        }
    pl->P = P, pl->E = E, pl->S = S;
    pl->rank_begin = (int64_t *)calloc((size_t)P + 1, sizeof(int64_t));
    pl->slot_expert = (int32_t *)calloc((size_t)S + 1, sizeof(int32_t));
    pl->slot_rank = (int32_t *)calloc((size_t)S + 1, sizeof(int32_t));
    pl->rep_begin = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    pl->rep_slot = (int64_t *)calloc((size_t)S + 1, sizeof(int64_t));
    pl->piece_off = (int64_t *)calloc((size_t)S + 1, sizeof(int64_t));
    pl->piece_rows = (int64_t *)calloc((size_t)S + 1, sizeof(int64_t));
    if (!pl->rank_begin || !pl->slot_expert || !pl->slot_rank || !pl->rep_begin ||
        !pl->rep_slot || !pl->piece_off || !pl->piece_rows) {
        moe__placement_free(pl);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "placement tables for %lld slots", (long long)S);
    }
    at = 0;
    for (int q = 0; q < P; ++q) {
        pl->rank_begin[q] = at;
        if (num_local[q] > pl->E_max) pl->E_max = num_local[q];
        for (int64_t i = 0; i < num_local[q]; ++i, ++at) {
            pl->slot_expert[at] = experts[at];
            pl->slot_rank[at] = q;
            pl->rep_begin[experts[at] + 1]++;
        }
    }
    pl->rank_begin[P] = S;
    for (int64_t e = 0; e < E; ++e) {
        if (pl->rep_begin[e + 1] == 0) {
            moe__placement_free(pl);
            return MOE_ERR(MOE_STATUS_INVALID_ARGUMENT,
                           "placement: expert %lld is held by no rank (every expert must be "
                           "placed at least once)",
                           (long long)e);
        }
        if (pl->rep_begin[e + 1] > 1) pl->replicated = 1;
        pl->rep_begin[e + 1] += pl->rep_begin[e];
    }
    int64_t *fill = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    if (!fill) {
        moe__placement_free(pl);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "placement tables");
    }
    for (int64_t k = 0; k < S; ++k) {
        int32_t e = pl->slot_expert[k];
        pl->rep_slot[pl->rep_begin[e] + fill[e]++] = k;
    }
    free(fill);
    /* contiguous: no replicas, each rank one id range, ranges in rank order; then the route's
     * expert-major buffer is destination-major and the rows go out without packing */
    pl->contiguous = !pl->replicated;
    int64_t next = 0;
    for (int64_t k = 0; k < S && pl->contiguous; ++k) pl->contiguous = pl->slot_expert[k] == next++;
    return MOE_STATUS_SUCCESS;
}

/* the layer's fields that follow from its placement */
static void apply(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    const moe_placement_t *pl = &L->pl;
    s->E_local = pl->rank_begin[s->rank + 1] - pl->rank_begin[s->rank];
    s->expert_begin = 0;
    s->pack_rows = L->ctx->world > 1 && !pl->contiguous;
    int64_t chunks = s->cfg.num_chunks ? s->cfg.num_chunks : MOE_DEFAULT_CHUNKS;
    L->ex.num_chunks = chunks < pl->E_max ? chunks : pl->E_max;
}

static moe_status_t default_tables(moe_placement_t *pl, int P, int64_t E) {
    int64_t *num = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    int32_t *ex = (int32_t *)malloc((size_t)E * sizeof(int32_t));
    if (!num || !ex) {
        free(num), free(ex);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "default placement");
    }
    for (int q = 0; q < P; ++q) num[q] = (q + 1) * E / P - q * E / P;
    for (int64_t e = 0; e < E; ++e) ex[e] = (int32_t)e;
    moe_status_t st = build(pl, P, E, num, ex);
    free(num), free(ex);
    return st;
}

moe_status_t moe__placement_init_default(moe_layer_t *L) {
    MOE_CHECK(default_tables(&L->pl, L->ctx->world, L->s.E));
    L->pl.load_acc = (double *)calloc((size_t)L->s.E, sizeof(double));
    if (!L->pl.load_acc) {
        moe__placement_free(&L->pl);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "per-expert load");
    }
    apply(L);
    return MOE_STATUS_SUCCESS;
}

void moe__placement_split(moe_layer_t *L, const int64_t *offsets) {
    moe_placement_t *pl = &L->pl;
    const int me = L->s.rank;
    for (int64_t e = 0; e < pl->E; ++e) {
        int64_t m = pl->rep_begin[e + 1] - pl->rep_begin[e];
        int64_t off = offsets[e], n = offsets[e + 1] - off;
        for (int64_t j = 0; j < m; ++j) {
            int64_t i = ((j - me) % m + m) % m; /* the part replica j gets */
            int64_t k = pl->rep_slot[pl->rep_begin[e] + j];
            pl->piece_off[k] = off + i * n / m;
            pl->piece_rows[k] = (i + 1) * n / m - i * n / m;
        }
    }
}

/* local slot of expert e on rank q, or -1 */
static int64_t local_slot(const moe_placement_t *pl, int q, int64_t e) {
    for (int64_t j = pl->rep_begin[e]; j < pl->rep_begin[e + 1]; ++j) {
        int64_t k = pl->rep_slot[j];
        if (pl->slot_rank[k] == q) return k - pl->rank_begin[q];
    }
    return -1;
}

/* ---------------------------------------------------------------------------------------------
 * per-expert arrays: parameters, gradients, moments
 * ------------------------------------------------------------------------------------------- */

/* elements of one expert's share of parameter p (0 for the router, the noise and turned-off
 * biases) */
static int64_t per_expert(const moe_layer_state_t *s, int p) {
    switch (p) {
    case MOE_PARAM_W1: return s->D * s->F2;
    case MOE_PARAM_B1: return s->cfg.expert_bias ? s->F2 : 0;
    case MOE_PARAM_W2: return s->F * s->D;
    case MOE_PARAM_B2: return s->cfg.expert_bias ? s->D : 0;
    default: return 0;
    }
}

/* Moves one per-expert array from the old placement to the new one: every new slot takes its
 * expert's rows from this rank's old copy when it had one, else from the lowest rank that had
 * it. old_a (El_old rows) -> new_a (El_new rows), row bytes each. Collective. */
static moe_status_t move_array(moe_layer_t *L, const moe_placement_t *op,
                               const moe_placement_t *np, const void *old_a, void *new_a,
                               size_t row) {
    moe_context_t *ctx = L->ctx;
    const moe_memory_ops_t *mem = &ctx->ops->mem;
    const int P = ctx->world, me = ctx->rank;
    int64_t *cnt = (int64_t *)calloc(4 * (size_t)P, sizeof(int64_t));
    if (!cnt) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "placement move plan");
    int64_t *sr = cnt, *so = cnt + P, *rr = cnt + 2 * P, *ro = cnt + 3 * P;
    /* source rank of new slot k */
#define SRC(k)                                                                                \
    (local_slot(op, np->slot_rank[k], np->slot_expert[k]) >= 0                                \
         ? np->slot_rank[k]                                                                   \
         : op->slot_rank[op->rep_slot[op->rep_begin[np->slot_expert[k]]]])
    int64_t ns = 0, nr = 0;
    for (int q = 0; q < P; ++q) {
        so[q] = ns, ro[q] = nr;
        for (int64_t k = np->rank_begin[q]; k < np->rank_begin[q + 1]; ++k)
            if (q != me && SRC(k) == me) sr[q]++;
        if (q != me)
            for (int64_t k = np->rank_begin[me]; k < np->rank_begin[me + 1]; ++k)
                if (SRC(k) == q) rr[q]++;
        ns += sr[q], nr += rr[q];
    }
    void *sendb = NULL, *recvb = NULL;
    moe_status_t st = MOE_STATUS_SUCCESS;
    if (ns) MOE_CHECK_GOTO(mem->alloc(ctx, &sendb, (size_t)ns * row), st, done);
    if (nr) MOE_CHECK_GOTO(mem->alloc(ctx, &recvb, (size_t)nr * row), st, done);
    int64_t at = 0;
    for (int q = 0; q < P; ++q)
        for (int64_t k = np->rank_begin[q]; k < np->rank_begin[q + 1]; ++k)
            if (q != me && SRC(k) == me) {
                int64_t le = local_slot(op, me, np->slot_expert[k]);
                MOE_CHECK_GOTO(mem->copy(ctx, (char *)sendb + (size_t)at++ * row,
                                         (const char *)old_a + (size_t)le * row, row,
                                         MOE_COPY_D2D, NULL),
                               st, done);
            }
    MOE_CHECK_GOTO(moe__comm_alltoallv_rows(ctx->comm, &ctx->mem, sendb, sr, so, recvb, rr, ro,
                                            row, NULL),
                   st, done);
    int64_t *got = (int64_t *)calloc((size_t)P, sizeof(int64_t));
    if (!got) {
        st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "placement move plan");
        goto done;
    }
    for (int64_t k = np->rank_begin[me]; k < np->rank_begin[me + 1] && st == 0; ++k) {
        int q = SRC(k);
        const char *from = q == me ? (const char *)old_a +
                                         (size_t)local_slot(op, me, np->slot_expert[k]) * row
                                   : (const char *)recvb + (size_t)(ro[q] + got[q]++) * row;
        st = mem->copy(ctx, (char *)new_a + (size_t)(k - np->rank_begin[me]) * row, from, row,
                       MOE_COPY_D2D, NULL);
    }
#undef SRC
    free(got);
    if (st == MOE_STATUS_SUCCESS) st = mem->sync(ctx, NULL);
done:
    mem->free(ctx, sendb), mem->free(ctx, recvb);
    free(cnt);
    return st;
}

/* FNV-1a of what every rank must pass alike */
static uint64_t placement_hash(int P, const int64_t *num_local, const int32_t *experts,
                               int64_t S, int nmom) {
    uint64_t h = 1469598103934665603ull;
#define MIX(v)                                                                                \
    do {                                                                                      \
        uint64_t v_ = (uint64_t)(v);                                                          \
        for (int i_ = 0; i_ < 8; ++i_) h = (h ^ ((v_ >> (8 * i_)) & 0xFF)) * 1099511628211ull; \
    } while (0)
    MIX(P);
    MIX(nmom);
    for (int q = 0; q < P; ++q) MIX(num_local[q]);
    for (int64_t k = 0; k < S; ++k) MIX(experts[k]);
#undef MIX
    return h;
}

/* ---------------------------------------------------------------------------------------------
 * public calls
 * ------------------------------------------------------------------------------------------- */

#define MOE_NARRAYS (3 * 4) /* parameter, gradient, two moments; of W1, B1, W2, B2 */

static moe_status_t placement_args(const moe_layer_t *layer, const int64_t *num_local,
                                   const int32_t *experts, moe_optimizer_t *opt, int *nmom) {
    MOE_ARG(num_local != NULL, "num_local is NULL");
    MOE_ARG(experts != NULL, "experts is NULL");
    if (opt) {
        MOE_ARG(moe__optimizer_layer(opt) == layer, "opt is not an optimizer of this layer");
        *nmom = moe__optimizer_num_moments(opt);
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_set_placement(moe_layer_t *layer, const int64_t *num_local,
                                     const int32_t *experts, moe_optimizer_t *opt) {
    MOE_LAYER_ARG(layer);
    moe_context_t *ctx = layer->ctx;
    moe_layer_state_t *s = &layer->s;
    moe_placement_t np;
    memset(&np, 0, sizeof np);
    int nmom = 0;
    moe_status_t st = placement_args(layer, num_local, experts, opt, &nmom);
    if (st == MOE_STATUS_SUCCESS) st = build(&np, ctx->world, s->E, num_local, experts);
    if (ctx->world == 1) { /* every expert once, ascending: the placement the layer has */
        moe__placement_free(&np);
        return st;
    }
    st = moe__layer_agree(layer, MOE_CALL_SET_PLACEMENT, 0, st);
    if (st != MOE_STATUS_SUCCESS) {
        moe__placement_free(&np);
        return st;
    }
    {
        uint64_t *all = (uint64_t *)malloc((size_t)ctx->world * sizeof(uint64_t));
        if (!all) st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "placement check");
        if (st == MOE_STATUS_SUCCESS)
            st = moe__comm_allgather_u64(ctx->comm,
                                         placement_hash(ctx->world, num_local, experts, np.S, nmom),
                                         all);
        /* a failure so far breaks the communicator (the peers are in the all-gather); a
         * mismatch below is seen by every rank alike */
        st = moe__layer_finish(layer, st);
        for (int q = 0; q < ctx->world && st == MOE_STATUS_SUCCESS; ++q)
            if (all[q] != all[ctx->rank])
                st = MOE_ERR(MOE_STATUS_INVALID_ARGUMENT,
                             "rank %d: the placement (or whether an optimizer with moments was "
                             "passed) differs from rank %d's; every rank must pass the same",
                             ctx->rank, q);
        free(all);
    }
    if (st != MOE_STATUS_SUCCESS) {
        moe__placement_free(&np);
        return st;
    }
    /* every new array first: a failed allocation changes nothing */
    const int64_t El = np.rank_begin[ctx->rank + 1] - np.rank_begin[ctx->rank];
    const size_t esz = moe_dtype_size(s->cfg.dtype);
    void *fresh[MOE_NARRAYS] = {0};
    void **slots[MOE_NARRAYS] = {0};
    size_t rowb[MOE_NARRAYS] = {0};
    for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2; ++p) {
        int i = 3 * (p - MOE_PARAM_W1);
        int64_t n = per_expert(s, p);
        if (n == 0) continue;
        slots[i] = &s->param[p], rowb[i] = (size_t)n * esz;
        slots[i + 1] = &s->grad[p], rowb[i + 1] = (size_t)n * esz;
        for (int b = 0; b < nmom; ++b) {
            if (b == 0) slots[i + 2] = moe__optimizer_moment(opt, p, 0);
            rowb[i + 2] = (size_t)n * sizeof(float);
        }
        (void)0;
    }
    /* the second moments ride in a pass of their own below */
    for (int i = 0; i < MOE_NARRAYS && st == MOE_STATUS_SUCCESS; ++i)
        if (slots[i] && El > 0) st = ctx->ops->mem.alloc(ctx, &fresh[i], (size_t)El * rowb[i]);
    void *fresh_v[4] = {0};
    if (nmom == 2)
        for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2 && st == MOE_STATUS_SUCCESS; ++p)
            if (per_expert(s, p) && El > 0)
                st = ctx->ops->mem.alloc(ctx, &fresh_v[p - MOE_PARAM_W1],
                                         (size_t)El * (size_t)per_expert(s, p) * sizeof(float));
    /* every rank allocated, or none goes on (a rank without its arrays would never join the
     * moves) */
    st = moe__layer_agree(layer, MOE_CALL_PLACEMENT_ALLOCATED, 0, st);
    for (int i = 0; i < MOE_NARRAYS && st == MOE_STATUS_SUCCESS; ++i)
        if (slots[i]) st = move_array(layer, &layer->pl, &np, *slots[i], fresh[i], rowb[i]);
    if (nmom == 2)
        for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2 && st == MOE_STATUS_SUCCESS; ++p)
            if (per_expert(s, p))
                st = move_array(layer, &layer->pl, &np, *moe__optimizer_moment(opt, p, 1),
                                fresh_v[p - MOE_PARAM_W1],
                                (size_t)per_expert(s, p) * sizeof(float));
    st = moe__layer_finish(layer, st); /* the moves were the last collectives */
    if (st != MOE_STATUS_SUCCESS) {
        for (int i = 0; i < MOE_NARRAYS; ++i) ctx->ops->mem.free(ctx, fresh[i]);
        for (int i = 0; i < 4; ++i) ctx->ops->mem.free(ctx, fresh_v[i]);
        moe__placement_free(&np);
        return st;
    }
    for (int i = 0; i < MOE_NARRAYS; ++i)
        if (slots[i]) {
            ctx->ops->mem.free(ctx, *slots[i]);
            *slots[i] = fresh[i];
        }
    if (nmom == 2)
        for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2; ++p)
            if (per_expert(s, p)) {
                void **v = moe__optimizer_moment(opt, p, 1);
                ctx->ops->mem.free(ctx, *v);
                *v = fresh_v[p - MOE_PARAM_W1];
            }
    for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2; ++p) s->numel[p] = El * per_expert(s, p);

    /* the new tables; the running load stays */
    np.load_acc = layer->pl.load_acc;
    layer->pl.load_acc = NULL;
    moe__placement_free(&layer->pl);
    layer->pl = np;
    if (ctx->ops->layer_fini) {
        moe_backend_layer_t bl = moe__backend_layer(s);
        ctx->ops->layer_fini(ctx, &bl);
        s->impl = NULL;
    }
    apply(layer);
    /* the buffers regrow for the new expert side at the next forward, which must come before a
     * backward */
    moe__buffers_free(layer);
    s->have_forward = 0;
    if (ctx->ops->layer_init) {
        moe_backend_layer_t bl = moe__backend_layer(s);
        st = ctx->ops->layer_init(ctx, &bl);
        s->impl = bl.impl;
    }
    return st;
}

moe_status_t moe_layer_get_placement(const moe_layer_t *layer, int64_t *num_local,
                                     int32_t *experts, int64_t *num_slots) {
    MOE_LAYER_ARG(layer);
    const moe_placement_t *pl = &layer->pl;
    if (num_slots) *num_slots = pl->S;
    if (num_local)
        for (int q = 0; q < pl->P; ++q) num_local[q] = pl->rank_begin[q + 1] - pl->rank_begin[q];
    if (experts) memcpy(experts, pl->slot_expert, (size_t)pl->S * sizeof(int32_t));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_reduce_replica_grads(moe_layer_t *layer, void *stream) {
    MOE_LAYER_ARG(layer);
    moe_context_t *ctx = layer->ctx;
    const moe_placement_t *pl = &layer->pl;
    moe_layer_state_t *s = &layer->s;
    if (ctx->world == 1 || !pl->replicated) return MOE_STATUS_SUCCESS;
    MOE_CHECK(moe__layer_agree(
        layer, MOE_CALL_REDUCE_REPLICA_GRADS, 0,
        s->cfg.dtype == MOE_DTYPE_F32
            ? MOE_STATUS_SUCCESS
            : MOE_ERR(MOE_STATUS_INVALID_ARGUMENT, "the replica gradient sum needs f32 storage")));
    const int P = ctx->world, me = ctx->rank;
    const int64_t k0 = pl->rank_begin[me], El = s->E_local;
    int64_t *cnt = (int64_t *)calloc(4 * (size_t)P, sizeof(int64_t));
    if (!cnt)
        return moe__layer_finish(layer,
                                 MOE_ERR(MOE_STATUS_ALLOC_FAILED, "replica gradient plan"));
    int64_t *sr = cnt, *so = cnt + P, *rr = cnt + 2 * P, *ro = cnt + 3 * P;
    /* rank q and this rank exchange the experts both hold, in expert order, both ways */
    int64_t tot = 0;
    for (int q = 0; q < P; ++q) {
        so[q] = ro[q] = tot;
        if (q != me)
            for (int64_t le = 0; le < El; ++le)
                if (local_slot(pl, q, pl->slot_expert[k0 + le]) >= 0) sr[q]++;
        rr[q] = sr[q];
        tot += sr[q];
    }
    moe_status_t st = MOE_STATUS_SUCCESS;
    const moe_memory_ops_t *mem = &ctx->ops->mem;
    void *sendb = NULL, *recvb = NULL;
    float *mine = NULL, *peers = NULL;
    for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2 && st == MOE_STATUS_SUCCESS; ++p) {
        const int64_t n = per_expert(s, p);
        if (n == 0) continue;
        const size_t row = (size_t)n * sizeof(float);
        float *g = (float *)s->grad[p];
        if (tot) {
            MOE_CHECK_GOTO(mem->alloc(ctx, &sendb, (size_t)tot * row), st, done);
            MOE_CHECK_GOTO(mem->alloc(ctx, &recvb, (size_t)tot * row), st, done);
        }
        int64_t at = 0;
        for (int q = 0; q < P; ++q)
            if (q != me)
                for (int64_t le = 0; le < El; ++le)
                    if (local_slot(pl, q, pl->slot_expert[k0 + le]) >= 0)
                        MOE_CHECK_GOTO(mem->copy(ctx, (char *)sendb + (size_t)at++ * row,
                                                 g + le * n, row, MOE_COPY_D2D, stream),
                                       st, done);
        MOE_CHECK_GOTO(moe__comm_alltoallv_rows(ctx->comm, &ctx->mem, sendb, sr, so, recvb, rr,
                                                ro, row, stream),
                       st, done);
        /* the sum on the host, over the holders in rank order: the same operations on every
         * replica, so the replicas' gradients stay bitwise equal */
        mine = (float *)malloc((size_t)(El ? El : 1) * row);
        peers = (float *)malloc((size_t)(tot ? tot : 1) * row);
        float *acc = (float *)malloc(row);
        if (!mine || !peers || !acc) {
            free(acc);
            st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "replica gradient staging");
            goto done;
        }
        if (El) MOE_CHECK_GOTO(mem->copy(ctx, mine, g, (size_t)El * row, MOE_COPY_D2H, stream),
                               st, done_acc);
        if (tot)
            MOE_CHECK_GOTO(mem->copy(ctx, peers, recvb, (size_t)tot * row, MOE_COPY_D2H, stream),
                           st, done_acc);
        MOE_CHECK_GOTO(mem->sync(ctx, stream), st, done_acc);
        for (int64_t le = 0; le < El; ++le) {
            int64_t e = pl->slot_expert[k0 + le];
            if (pl->rep_begin[e + 1] - pl->rep_begin[e] < 2) continue;
            for (int64_t j = pl->rep_begin[e]; j < pl->rep_begin[e + 1]; ++j) {
                int q = pl->slot_rank[pl->rep_slot[j]];
                const float *part = mine + le * n;
                if (q != me) { /* its position among the experts q and this rank share */
                    int64_t pos = ro[q];
                    for (int64_t l2 = 0; l2 < le; ++l2)
                        if (local_slot(pl, q, pl->slot_expert[k0 + l2]) >= 0) pos++;
                    part = peers + pos * n;
                }
                if (j == pl->rep_begin[e])
                    memcpy(acc, part, row);
                else
                    for (int64_t i = 0; i < n; ++i) acc[i] += part[i];
            }
            MOE_CHECK_GOTO(mem->copy(ctx, g + le * n, acc, row, MOE_COPY_H2D, stream), st,
                           done_acc);
            MOE_CHECK_GOTO(mem->sync(ctx, stream), st, done_acc);
        }
    done_acc:
        free(acc);
    done:
        mem->free(ctx, sendb), mem->free(ctx, recvb);
        sendb = recvb = NULL;
        free(mine), free(peers);
        mine = peers = NULL;
    }
    free(cnt);
    return moe__layer_finish(layer, st);
}

moe_status_t moe_layer_expert_load(moe_layer_t *layer, double *load, int reset) {
    MOE_LAYER_ARG(layer);
    if (load) memcpy(load, layer->pl.load_acc, (size_t)layer->s.E * sizeof(double));
    if (reset) memset(layer->pl.load_acc, 0, (size_t)layer->s.E * sizeof(double));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_rebalance(moe_layer_t *layer, int64_t redundant, moe_optimizer_t *opt,
                                 double *imbalance_before, double *imbalance_after) {
    MOE_LAYER_ARG(layer);
    const int P = layer->ctx->world;
    const int64_t E = layer->s.E;
    /* the plan is computed on every rank from the same numbers: one agreement on the arguments
     * and the allocations, then moe_layer_set_placement (collective) */
    moe_status_t st = redundant >= 0 && redundant <= (int64_t)(P - 1) * E
                          ? MOE_STATUS_SUCCESS
                          : MOE_ERR(MOE_STATUS_INVALID_ARGUMENT,
                                    "redundant %lld is not in [0, (ranks - 1) x num_experts = "
                                    "%lld]",
                                    (long long)redundant, (long long)(P - 1) * E);
    int64_t *num = NULL, *cur = NULL;
    int32_t *ex = NULL;
    if (st == MOE_STATUS_SUCCESS) {
        num = (int64_t *)malloc((size_t)P * sizeof(int64_t));
        cur = (int64_t *)malloc((size_t)P * sizeof(int64_t));
        ex = (int32_t *)malloc((size_t)(E + redundant) * sizeof(int32_t));
        if (!num || !cur || !ex) st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "rebalance plan");
    }
    st = moe__layer_agree(layer, MOE_CALL_REBALANCE, 0, st);
    moe__layer_exchange_done(layer); /* the rest is this rank's, up to set_placement's own step */
    if (st != MOE_STATUS_SUCCESS) {
        free(num), free(cur), free(ex);
        return st;
    }
    const moe_placement_t *pl = &layer->pl;
    if (imbalance_before) {
        for (int q = 0; q < P; ++q) cur[q] = pl->rank_begin[q + 1] - pl->rank_begin[q];
        st = moe_placement_imbalance(pl->load_acc, E, P, cur, pl->slot_expert, imbalance_before);
    }
    /* every rank holds the same global counts, so every rank computes the same plan (and, with
     * the same numbers, fails the same way) */
    if (st == MOE_STATUS_SUCCESS)
        st = moe_plan_placement(pl->load_acc, E, P, redundant, num, ex, imbalance_after);
    if (st == MOE_STATUS_SUCCESS) st = moe_layer_set_placement(layer, num, ex, opt);
    if (st == MOE_STATUS_SUCCESS) memset(layer->pl.load_acc, 0, (size_t)E * sizeof(double));
    free(num), free(cur), free(ex);
    return st;
}

moe_status_t moe_placement_imbalance(const double *load, int64_t E, int P,
                                     const int64_t *num_local, const int32_t *experts,
                                     double *imbalance) {
    MOE_ARG(load != NULL && num_local != NULL && experts != NULL && imbalance != NULL,
            "load, num_local, experts and imbalance must not be NULL");
    MOE_ARG(E >= 1 && E <= 65536, "num_experts %lld is not in [1, 65536]", (long long)E);
    MOE_ARG(P >= 1 && P <= 65536, "ranks %d is not in [1, 65536]", P);
    moe_placement_t pl;
    MOE_CHECK(build(&pl, P, E, num_local, experts));
    double total = 0.0, mx = 0.0;
    for (int q = 0; q < P; ++q) {
        double r = 0.0;
        for (int64_t k = pl.rank_begin[q]; k < pl.rank_begin[q + 1]; ++k) {
            int32_t e = pl.slot_expert[k];
            r += load[e] / (double)(pl.rep_begin[e + 1] - pl.rep_begin[e]);
        }
        total += r;
        mx = r > mx ? r : mx;
    }
    *imbalance = total > 0.0 ? mx / (total / (double)P) : 1.0;
    moe__placement_free(&pl);
    return MOE_STATUS_SUCCESS;
}
