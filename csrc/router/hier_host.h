/* hier_host.h - the host side of hierarchical gating: both levels' aux-loss values and their
 * gradient coefficients from the sums of a gate pass (router/hier.h's layouts). */
#ifndef MOE_ROUTER_HIER_HOST_H
#define MOE_ROUTER_HIER_HOST_H

#include <stdint.h>

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* the gradient coefficients of both levels' aux losses (host, filled by moe_hier_finalize) */
typedef struct moe_hier_coefs {
    float *c;       /* (MOE_HIER_NCOEFS(G, E)) sw1, imp1, sw2, imp2 */
    float z1_scale; /* z_coef * 2 / T */
    float z2_scale; /* z_coef * 2 / (T k1) */
    int any_logit;  /* switch or z active: the logits get a gradient of their own */
} moe_hier_coefs_t;

/* From the sums (MOE_HIER_NSUMS(G, E) doubles, summed over ranks), the per-expert assignment
 * counts (E) and the token count over all ranks: every loss into stats (the per-level values
 * and their sums, num_tokens, num_assignments, aux_loss, imbalance) and the coefficients. */
moe_status_t moe_hier_finalize(const moe_layer_config_t *cfg, int64_t E, int64_t G, int64_t k1,
                               int64_t k2, const double *sums, const int64_t *counts,
                               int64_t T_total, moe_routing_stats_t *stats,
                               moe_hier_coefs_t *coefs);

#ifdef __cplusplus
}
#endif

#endif
