/* router_host.h - host-side routing rules shared by every backend: capacity, slot assignment,
 * and the per-expert aux-loss values and gradient coefficients. */
#ifndef MOE_ROUTER_ROUTER_HOST_H
#define MOE_ROUTER_ROUTER_HOST_H

#include <stdint.h>

#include "moe/moe.h"
#include "router/select.h"

#ifdef __cplusplus
extern "C" {
#endif

/* C = ceil(capacity_factor * T * K / E), or -1 when capacity_factor <= 0 (dropless) */
int64_t moe_router_capacity(double capacity_factor, int64_t T, int64_t K, int64_t E);

/* CV^2(v) = population variance / (mean^2 + 1e-10); grad (may be NULL) gets dCV^2/dv. */
double moe_router_cv2(const double *v, int64_t n, double *grad);

/* per-expert coefficient vectors of the aux-loss gradients (host, filled by moe_router_finalize) */
typedef struct moe_aux_coefs {
    float *switch_f; /* (E) switch_coef * E / T * f_e */
    float *imp;      /* (E) importance_coef * dCV2/dImp_e */
    float *load;     /* (E) load_coef * dCV2/dload_e */
    float z_scale;   /* z_coef * 2 / T */
    int any_logit;   /* switch or z active: logits get a gradient of their own */
} moe_aux_coefs_t;

/* the per-expert sums of one gate pass (host arrays of E; summed over ranks with expert
 * parallelism) */
typedef struct moe_router_sums {
    int64_t *counts;    /* assignments per expert before dropping */
    double *prob_sum;   /* sum_t softmax(logits_t)_e */
    double *importance; /* sum_t gate weight of e */
    double *load;       /* Shazeer's smooth load, or the count */
    double *z_sum;      /* (1) sum_t lse_t^2 */
} moe_router_sums_t;

/* From the sums of a gate pass and the token count over all ranks (cfg: the layer's effective
 * config, E experts, K per token, noisy: the pass drew gating noise): the loss values into
 * stats and the gradient coefficients into coefs. */
moe_status_t moe_router_finalize(const moe_layer_config_t *cfg, int64_t E, int64_t K, int noisy,
                                 const moe_router_sums_t *sums, int64_t T_total,
                                 moe_routing_stats_t *stats, moe_aux_coefs_t *coefs);

/* Slot assignment on the host (the rule every backend must reproduce exactly):
 * idx (T, ldi) chosen experts, gate (T, K) weights. Orders the T*K assignments by priority
 * (POSITION: j-major then token; SCORE: gate desc, ties by position), gives each the next slot
 * of its expert, keeps it when slot < capacity (or always when capacity < 0). Writes
 * row (T, K) = offsets[e] + slot or -1, offsets (E + 1) of the kept rows, dropped (E), and
 * returns the number of kept rows. order: scratch of T*K int64 (SCORE only, else may be NULL). */
int64_t moe_router_assign_slots(const int32_t *idx, int64_t ldi, const float *gate, int64_t T,
                                int64_t K, int64_t E, int64_t capacity, int priority,
                                int32_t *row, int64_t *offsets, int64_t *dropped,
                                int64_t *order);

/* The per-token options of the routing extensions from a layer's config; avail (E, in the
 * backend's memory) or NULL when every expert is available. */
moe_router_opts_t moe_router_opts_make(const moe_layer_config_t *cfg, const uint8_t *avail);

/* Expert availability of one forward (host, E bytes): avail = mask, and when dropout > 0 an
 * expert is dropped when its uniform u_e = Philox(seed; e, lo32(call), hi32(call) ^ "DROP") is
 * below dropout; if fewer than K available experts remain, the dropped ones with the largest u_e
 * (ties to the lower index) come back until K are available. Returns the available count. */
int64_t moe_router_availability(const uint8_t *mask, int64_t E, int64_t K, double dropout,
                                uint64_t seed, uint64_t call, uint8_t *avail);

#ifdef __cplusplus
}
#endif

#endif
