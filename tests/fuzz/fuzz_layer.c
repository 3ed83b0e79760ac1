/* fuzz_layer.c - libFuzzer target for the single-layer API on the CPU backend: a config from the
 * bytes (valid or not), then a call sequence (forward, backward, stats, routing, forced routing,
 * zero_grad, score bias, optimizer steps) with inputs that include NaN, Inf and huge values.
 * What must hold for any input: no crash, leak or sanitizer report; every call returns a
 * moe_status_t with a message when it fails; a forward or backward that returns SUCCESS gives
 * finite y or dx (non-finite results are reported as NUMERIC_ERROR). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_input.h"
#include "moe/moe.h"

#define FZ_MAX_T 48
#define FZ_MAX_D 16
#define FZ_MAX_E 12

/* a failing call must say why; a status outside the enum is a bug */
static void check_status(moe_status_t st) {
    if (st < MOE_STATUS_SUCCESS || st > MOE_STATUS_IO_ERROR) abort();
    if (st != MOE_STATUS_SUCCESS && moe_last_error()[0] == '\0') abort();
    if (st == MOE_STATUS_INTERNAL_ERROR) abort();
}

static moe_layer_config_t fuzz_config(fz_t *f) {
    moe_layer_config_t c = moe_layer_config_default();
    c.d_model = fz_range(f, 0, FZ_MAX_D);
    c.d_ff = fz_range(f, 0, 16);
    c.num_experts = fz_range(f, 0, FZ_MAX_E);
    c.top_k = fz_range(f, 0, 13);
    c.activation = (moe_activation_t)fz_range(f, 0, 5);
    c.gate = (moe_gate_t)fz_range(f, 0, 2);
    c.renormalize = fz_u8(f) & 1;
    c.noisy_gating = fz_u8(f) & 1;
    c.capacity_factor = fz_u8(f) & 1 ? fz_coef(f) : 0.0;
    c.priority = (moe_priority_t)fz_range(f, 0, 2);
    uint8_t losses = fz_u8(f);
    c.switch_loss_coef = losses & 1 ? fz_coef(f) : 0.0;
    c.importance_loss_coef = losses & 2 ? fz_coef(f) : 0.0;
    c.load_loss_coef = losses & 4 ? fz_coef(f) : 0.0;
    c.z_loss_coef = losses & 8 ? fz_coef(f) : 0.0;
    c.expert_bias = fz_u8(f) & 1;
    c.seed = fz_u32(f);
    c.router = (moe_router_type_t)fz_range(f, 0, 2);
    c.bias_update_rate = fz_u8(f) & 1 ? fz_coef(f) : 0.0;
    c.num_chunks = fz_range(f, 0, 3);
    /* shared experts (out of range values included) */
    c.num_shared_experts = fz_range(f, -1, 2);
    c.shared_d_ff = fz_range(f, 0, 6);
    c.shared_expert_gate = (int)fz_range(f, 0, 2);
    return c;
}

static int all_finite(const float *v, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (!isfinite(v[i])) return 0;
    return 1;
}

/* every parameter is finite (a weight may have been overwritten with an edge value) */
static int params_finite(moe_layer_t *L) {
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *v = NULL;
        int64_t n = 0;
        if (moe_layer_param(L, (moe_param_t)p, &v, NULL, &n) != MOE_STATUS_SUCCESS) abort();
        if (v && !all_finite((const float *)v, n)) return 0;
    }
    return 1;
}

static void run_ops(fz_t *f, moe_layer_t *L, const moe_layer_config_t *c) {
    static float x[FZ_MAX_T * FZ_MAX_D], y[FZ_MAX_T * FZ_MAX_D], dx[FZ_MAX_T * FZ_MAX_D];
    static float gate[FZ_MAX_T * FZ_MAX_E];
    static int32_t idx[FZ_MAX_T * FZ_MAX_E], kept[FZ_MAX_T * FZ_MAX_E];
    const int64_t D = c->d_model, E = c->num_experts;
    const int64_t W = moe_layer_routing_width(L);
    int64_t T_last = -1;
    moe_optimizer_t *opt = NULL;
    for (int step = 0; step < 12 && f->n > 0; ++step) {
        moe_status_t st = MOE_STATUS_SUCCESS;
        switch (fz_u8(f) % 10) {
        case 0: /* forward */
        case 1: {
            int64_t T = fz_range(f, 0, FZ_MAX_T);
            for (int64_t i = 0; i < T * D; ++i) x[i] = fz_float(f);
            st = moe_layer_forward(L, x, y, T, fz_u8(f) & 1, NULL);
            /* with the numeric checks on (the default) a forward that succeeds gives finite y
             * whatever x and the parameters were; NUMERIC_ERROR ran to the end (backward may
             * follow) */
            if (st == MOE_STATUS_SUCCESS && !all_finite(y, T * D)) abort();
            if (st == MOE_STATUS_SUCCESS ||
                (st == MOE_STATUS_NUMERIC_ERROR && all_finite(x, T * D)))
                T_last = T;
            if (st == MOE_STATUS_NUMERIC_ERROR && all_finite(x, T * D) && params_finite(L) &&
                all_finite(y, T * D))
                abort(); /* reported, but nothing was non-finite */
            break;
        }
        case 2: /* backward */
            if (T_last < 0) break;
            for (int64_t i = 0; i < T_last * D; ++i) y[i] = fz_float(f);
            st = moe_layer_backward(L, y, dx, NULL);
            if (st == MOE_STATUS_SUCCESS && !all_finite(dx, T_last * D)) abort();
            break;
        case 3: { /* stats and routing */
            moe_routing_stats_t s;
            int64_t tok[FZ_MAX_E], drop[FZ_MAX_E];
            st = moe_layer_stats(L, &s, tok, drop);
            check_status(st);
            st = moe_layer_routing(L, idx, gate, kept);
            break;
        }
        case 4: { /* forced routing, possibly for another token count or out-of-range experts */
            int64_t T = fz_range(f, 0, FZ_MAX_T);
            for (int64_t i = 0; i < T * W; ++i) {
                idx[i] = (int32_t)fz_range(f, -1, E);
                gate[i] = fz_float(f);
            }
            st = moe_layer_force_routing(L, idx, gate, T);
            break;
        }
        case 9: { /* per-expert outputs, forward and then backward */
            static float ye[FZ_MAX_T * FZ_MAX_E * FZ_MAX_D], ge[FZ_MAX_T * FZ_MAX_E];
            int64_t T = fz_range(f, 0, FZ_MAX_T);
            for (int64_t i = 0; i < T * D; ++i) x[i] = fz_float(f);
            int finite_in = all_finite(x, T * D) && params_finite(L);
            st = moe_layer_forward_experts(L, x, ye, ge, T, fz_u8(f) & 1, NULL);
            if (st != MOE_STATUS_SUCCESS) break;
            T_last = T;
            if (finite_in && (!all_finite(ye, T * W * D) || !all_finite(ge, T * W))) abort();
            for (int64_t i = 0; i < T * W * D; ++i) ye[i] = fz_float(f);
            for (int64_t i = 0; i < T * W; ++i) ge[i] = fz_float(f);
            st = moe_layer_backward_experts(L, ye, ge, dx, NULL);
            break;
        }
        case 5: st = moe_layer_zero_grad(L, NULL); break;
        case 6: { /* score bias */
            float b[FZ_MAX_E];
            for (int64_t e = 0; e < E; ++e) b[e] = fz_float(f);
            st = moe_layer_set_score_bias(L, b);
            break;
        }
        case 7: { /* an optimizer step (created on first use) */
            if (!opt) {
                moe_optimizer_config_t oc =
                    moe_optimizer_config_default((moe_optimizer_kind_t)fz_range(f, 0, 3));
                oc.lr = fz_coef(f);
                st = moe_optimizer_create(&opt, L, &oc);
                check_status(st);
                if (st != MOE_STATUS_SUCCESS) opt = NULL;
            }
            if (opt) st = moe_optimizer_step(opt, NULL);
            break;
        }
        case 8: { /* overwrite one weight value */
            void *v = NULL;
            int64_t n = 0;
            st = moe_layer_param(L, (moe_param_t)fz_range(f, 0, MOE_PARAM_COUNT - 1), &v, NULL,
                                 &n);
            if (st == MOE_STATUS_SUCCESS && v && n > 0)
                ((float *)v)[fz_range(f, 0, n - 1)] = fz_float(f);
            break;
        }
        }
        check_status(st);
    }
    if (opt) check_status(moe_optimizer_destroy(opt));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static moe_context_t *ctx;
    if (!ctx && moe_context_create(&ctx, MOE_BACKEND_CPU, 0, NULL) != MOE_STATUS_SUCCESS) abort();
    fz_t f = {data, size};
    moe_layer_config_t c = fuzz_config(&f);
    moe_layer_t *L = NULL;
    moe_status_t st = moe_layer_create(&L, ctx, &c);
    check_status(st);
    if (st != MOE_STATUS_SUCCESS) {
        if (L != NULL) abort(); /* a failed create hands out no handle */
        return 0;
    }
    run_ops(&f, L, &c);
    check_status(moe_layer_destroy(L));
    return 0;
}
