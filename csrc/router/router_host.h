/* router_host.h - host-side routing rules shared by every backend: capacity, slot assignment,
 * and the per-expert aux-loss values and gradient coefficients. */
#ifndef MOE_ROUTER_ROUTER_HOST_H
#define MOE_ROUTER_ROUTER_HOST_H

#include <stdint.h>

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* C = ceil(capacity_factor * T * K / E), or -1 when capacity_factor <= 0 (dropless) */
int64_t moe_router_capacity(double capacity_factor, int64_t T, int64_t K, int64_t E);

/* CV^2(v) = population variance / (mean^2 + 1e-10); grad (may be NULL) gets dCV^2/dv. */
double moe_router_cv2(const double *v, int64_t n, double *grad);

/* From the per-expert sums the gate pass left in s (counts_h, prob_sum_h, importance_h, load_h,
 * z_sum — summed over ranks with expert parallelism) and the token count over all ranks: the
 * loss values into s->stats and the gradient coefficients into s->coefs. */
moe_status_t moe_router_finalize(moe_layer_state_t *s, int64_t T_total);

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

#ifdef __cplusplus
}
#endif

#endif
