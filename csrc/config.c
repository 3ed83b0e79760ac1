/* config.c - the layer config: defaults, validation (INVALID_ARGUMENT naming the field) and the
 * hash the ranks of a communicator compare. */
#include <math.h>
#include <string.h>

#include "config.h"
#include "core/dtype.h"
#include "core/status.h"
#include "state.h"

moe_layer_config_t moe_layer_config_default(void) {
    moe_layer_config_t c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    c.d_model = 512;
    c.d_ff = 2048;
    c.num_experts = 8;
    c.top_k = 2;
    c.activation = MOE_ACTIVATION_GELU;
    c.dtype = MOE_DTYPE_F32;
    c.gate = MOE_GATE_SOFTMAX_OF_TOPK;
    c.renormalize = 1;
    c.noisy_gating = 0;
    c.capacity_factor = 0.0;
    c.priority = MOE_PRIORITY_POSITION;
    c.expert_bias = 1;
    c.seed = 1234;
    /* routing extensions */
    c.score_func = MOE_SCORE_SOFTMAX;
    c.routed_scaling_factor = 1.0;
    c.group_score = MOE_GROUP_SCORE_TOP2_SUM;
    return c;
}

/* the fields of the routing extensions (moe.h's block of the same name) */
static moe_status_t validate_routing_ext(const moe_layer_config_t *c) {
    MOE_ARG(c->score_func == MOE_SCORE_SOFTMAX || c->score_func == MOE_SCORE_SIGMOID,
            "cfg->score_func %d is not a moe_score_func_t", (int)c->score_func);
    MOE_ARG(isfinite(c->routed_scaling_factor) && c->routed_scaling_factor > 0.0,
            "cfg->routed_scaling_factor must be finite and > 0");
    /* hierarchical routing's groups: validate_groups */
    const int grouped = c->router != MOE_ROUTER_HIERARCHICAL && c->num_groups > 1;
    MOE_ARG(c->router == MOE_ROUTER_HIERARCHICAL ||
                (c->num_groups >= 0 && c->num_groups <= c->num_experts),
            "cfg->num_groups %lld is not in [0, num_experts = %lld]", (long long)c->num_groups,
            (long long)c->num_experts);
    if (grouped) {
        MOE_ARG(c->num_experts % c->num_groups == 0,
                "cfg->num_groups %lld does not divide num_experts %lld",
                (long long)c->num_groups, (long long)c->num_experts);
        MOE_ARG(c->topk_group >= 1 && c->topk_group <= c->num_groups,
                "cfg->topk_group %lld is not in [1, num_groups = %lld]",
                (long long)c->topk_group, (long long)c->num_groups);
        MOE_ARG(c->topk_group * (c->num_experts / c->num_groups) >= c->top_k,
                "cfg->topk_group %lld groups of %lld experts hold fewer than top_k = %lld",
                (long long)c->topk_group, (long long)(c->num_experts / c->num_groups),
                (long long)c->top_k);
        MOE_ARG(c->group_score == MOE_GROUP_SCORE_TOP2_SUM || c->group_score == MOE_GROUP_SCORE_MAX,
                "cfg->group_score %d is not a moe_group_score_t", (int)c->group_score);
    }
    MOE_ARG(isfinite(c->expert_dropout) && c->expert_dropout >= 0.0 && c->expert_dropout < 1.0,
            "cfg->expert_dropout must be in [0, 1)");
    const int ext = c->score_func != MOE_SCORE_SOFTMAX || grouped ||
                    c->expert_dropout > 0.0 || c->routed_scaling_factor != 1.0;
    MOE_ARG(!ext || !c->noisy_gating,
            "cfg->noisy_gating with cfg->score_func / num_groups / expert_dropout / "
            "routed_scaling_factor: Shazeer's noisy gating and load estimator are defined for "
            "plain softmax routing only");
    MOE_ARG(!ext || c->router == MOE_ROUTER_TOKEN_CHOICE,
            "cfg->router: score_func / num_groups / expert_dropout / routed_scaling_factor "
            "apply to token choice only");
    return MOE_STATUS_SUCCESS;
}

/* the expert groups of hierarchical routing (moe.h's block "expert groups under hierarchical
 * routing") */
static moe_status_t validate_groups(const moe_layer_config_t *c) {
    MOE_ARG(c->num_groups >= 0, "cfg->num_groups %lld is negative", (long long)c->num_groups);
    MOE_ARG(c->topk_group >= 0, "cfg->topk_group %lld is negative", (long long)c->topk_group);
    /* group-limited token choice: validate_routing_ext */
    if (c->router != MOE_ROUTER_HIERARCHICAL) return MOE_STATUS_SUCCESS;
    const int64_t E = c->num_experts, G = c->num_groups;
    MOE_ARG(G >= 1 && G <= E, "cfg->num_groups %lld is not in [1, num_experts = %lld]",
            (long long)G, (long long)E);
    MOE_ARG(E % G == 0, "cfg->num_groups %lld does not divide num_experts %lld", (long long)G,
            (long long)E);
    MOE_ARG(c->topk_group >= 1 && c->topk_group <= G,
            "cfg->topk_group %lld is not in [1, num_groups = %lld]", (long long)c->topk_group,
            (long long)G);
    MOE_ARG(c->top_k % c->topk_group == 0,
            "cfg->top_k %lld is not divisible by cfg->topk_group %lld (top_k = topk_group x "
            "experts per chosen group)",
            (long long)c->top_k, (long long)c->topk_group);
    MOE_ARG(c->top_k / c->topk_group <= E / G,
            "cfg->top_k %lld / topk_group %lld = %lld experts per chosen group exceeds the %lld "
            "experts of a group",
            (long long)c->top_k, (long long)c->topk_group, (long long)(c->top_k / c->topk_group),
            (long long)(E / G));
    if (c->noisy_gating)
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "cfg->noisy_gating: router = MOE_ROUTER_HIERARCHICAL has no gating noise "
                       "in this build");
    if (c->bias_update_rate != 0.0)
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "cfg->bias_update_rate: loss-free bias balancing is not defined for "
                       "router = MOE_ROUTER_HIERARCHICAL");
    return MOE_STATUS_SUCCESS;
}

/* the shared-expert block of the config (moe.h): S >= 0, a width when S > 0, and no setting
 * that would be ignored */
static moe_status_t validate_shared(const moe_layer_config_t *c) {
    MOE_ARG(c->num_shared_experts >= 0 && c->num_shared_experts <= 1024,
            "cfg->num_shared_experts %lld is not in [0, 1024]", (long long)c->num_shared_experts);
    MOE_ARG(c->shared_d_ff >= 0 && c->shared_d_ff <= (1 << 22),
            "cfg->shared_d_ff %lld is not in [0, 2^22] (0 = d_ff)", (long long)c->shared_d_ff);
    MOE_ARG(c->shared_expert_gate == 0 || c->shared_expert_gate == 1,
            "cfg->shared_expert_gate %d is not 0 or 1", c->shared_expert_gate);
    MOE_ARG(c->num_shared_experts > 0 || c->shared_d_ff == 0,
            "cfg->shared_d_ff %lld is set but cfg->num_shared_experts is 0",
            (long long)c->shared_d_ff);
    MOE_ARG(c->num_shared_experts > 0 || c->shared_expert_gate == 0,
            "cfg->shared_expert_gate is 1 but cfg->num_shared_experts is 0");
    if (c->num_shared_experts > 0 && c->d_model >= 1 && c->d_ff >= 1) {
        int64_t fs = c->shared_d_ff > 0 ? c->shared_d_ff : c->d_ff;
        int64_t fs2 = c->activation == MOE_ACTIVATION_SWIGLU ? 2 * fs : fs;
        MOE_ARG(c->d_model * fs2 <= MOE_MAX_NUMEL / c->num_shared_experts,
                "shared expert weights of num_shared_experts x d_model x shared_d_ff = "
                "%lld x %lld x %lld are too large",
                (long long)c->num_shared_experts, (long long)c->d_model, (long long)fs2);
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__config_validate(const moe_layer_config_t *c, moe_backend_t backend) {
    MOE_ARG(c->struct_size == sizeof(moe_layer_config_t),
            "cfg->struct_size is %zu, expected %zu: start from moe_layer_config_default()",
            c->struct_size, sizeof(moe_layer_config_t));
    MOE_ARG(c->d_model >= 1 && c->d_model <= (1 << 20), "cfg->d_model %lld is not in [1, 2^20]",
            (long long)c->d_model);
    MOE_ARG(c->d_ff >= 1 && c->d_ff <= (1 << 22), "cfg->d_ff %lld is not in [1, 2^22]",
            (long long)c->d_ff);
    MOE_ARG(c->num_experts >= 1 && c->num_experts <= 65536,
            "cfg->num_experts %lld is not in [1, 65536]", (long long)c->num_experts);
    MOE_ARG(c->top_k >= 1 && c->top_k <= c->num_experts,
            "cfg->top_k %lld is not in [1, num_experts = %lld]", (long long)c->top_k,
            (long long)c->num_experts);
    MOE_ARG(c->activation >= MOE_ACTIVATION_RELU && c->activation <= MOE_ACTIVATION_IDENTITY,
            "cfg->activation %d is not a moe_activation_t", (int)c->activation);
    MOE_ARG(c->dtype >= MOE_DTYPE_F32 && c->dtype <= MOE_DTYPE_F16,
            "cfg->dtype %d is not a moe_dtype_t", (int)c->dtype);
    MOE_ARG(c->gate == MOE_GATE_SOFTMAX_OF_TOPK || c->gate == MOE_GATE_TOPK_OF_SOFTMAX,
            "cfg->gate %d is not a moe_gate_t", (int)c->gate);
    MOE_ARG(c->priority == MOE_PRIORITY_POSITION || c->priority == MOE_PRIORITY_SCORE,
            "cfg->priority %d is not a moe_priority_t", (int)c->priority);
    MOE_ARG(isfinite(c->capacity_factor), "cfg->capacity_factor is not finite");
    MOE_ARG(c->router == MOE_ROUTER_TOKEN_CHOICE || c->router == MOE_ROUTER_EXPERT_CHOICE ||
                c->router == MOE_ROUTER_HIERARCHICAL,
            "cfg->router %d is not a moe_router_type_t", (int)c->router);
    MOE_CHECK(validate_groups(c));
    MOE_ARG(isfinite(c->bias_update_rate) && c->bias_update_rate >= 0.0 &&
                c->bias_update_rate <= MOE_MAX_BIAS_UPDATE_RATE,
            "cfg->bias_update_rate %g is not in [0, %g]", c->bias_update_rate,
            MOE_MAX_BIAS_UPDATE_RATE);
    MOE_ARG(c->bias_update_rate == 0.0 || c->router == MOE_ROUTER_TOKEN_CHOICE,
            "cfg->bias_update_rate: loss-free bias balancing applies to token choice, not to "
            "expert choice (which is balanced by construction)");
    MOE_ARG(c->bias_update_rate == 0.0 || !c->noisy_gating,
            "cfg->bias_update_rate with cfg->noisy_gating: Shazeer's load estimator is not "
            "defined for a biased selection; use one balancing method");
    MOE_ARG(c->num_chunks >= 0 && c->num_chunks <= MOE_MAX_CHUNKS,
            "cfg->num_chunks %lld is not in [0, %d]", (long long)c->num_chunks, MOE_MAX_CHUNKS);
    MOE_ARG(isfinite(c->switch_loss_coef) && c->switch_loss_coef >= 0.0 &&
                c->switch_loss_coef <= MOE_MAX_LOSS_COEF,
            "cfg->switch_loss_coef %g is not in [0, %g]", c->switch_loss_coef, MOE_MAX_LOSS_COEF);
    MOE_ARG(isfinite(c->importance_loss_coef) && c->importance_loss_coef >= 0.0 &&
                c->importance_loss_coef <= MOE_MAX_LOSS_COEF,
            "cfg->importance_loss_coef %g is not in [0, %g]", c->importance_loss_coef, MOE_MAX_LOSS_COEF);
    MOE_ARG(isfinite(c->load_loss_coef) && c->load_loss_coef >= 0.0 &&
                c->load_loss_coef <= MOE_MAX_LOSS_COEF,
            "cfg->load_loss_coef %g is not in [0, %g]", c->load_loss_coef, MOE_MAX_LOSS_COEF);
    MOE_ARG(isfinite(c->z_loss_coef) && c->z_loss_coef >= 0.0 &&
                c->z_loss_coef <= MOE_MAX_LOSS_COEF,
            "cfg->z_loss_coef %g is not in [0, %g]", c->z_loss_coef, MOE_MAX_LOSS_COEF);
    MOE_CHECK(validate_shared(c));
    int64_t f2 = c->activation == MOE_ACTIVATION_SWIGLU ? 2 * c->d_ff : c->d_ff;
    MOE_ARG(c->d_model * f2 <= MOE_MAX_NUMEL / c->num_experts,
            "expert weights of num_experts x d_model x d_ff = %lld x %lld x %lld are too large",
            (long long)c->num_experts, (long long)c->d_model, (long long)f2);
    MOE_CHECK(validate_routing_ext(c));
    if (backend == MOE_BACKEND_CPU && c->dtype != MOE_DTYPE_F32)
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "cfg->dtype %s: the CPU backend computes in f32 only",
                       moe_dtype_name(c->dtype));
    return MOE_STATUS_SUCCESS;
}

/* FNV-1a over the fields that must agree on every rank */
uint64_t moe__config_hash(const moe_layer_config_t *c) {
    uint64_t h = 1469598103934665603ull;
#define MOE_MIX(v)                                                                            \
    do {                                                                                      \
        uint64_t v_ = (uint64_t)(v);                                                          \
        for (int i_ = 0; i_ < 8; ++i_) h = (h ^ ((v_ >> (8 * i_)) & 0xFF)) * 1099511628211ull; \
    } while (0)
    MOE_MIX(c->d_model); MOE_MIX(c->d_ff); MOE_MIX(c->num_experts); MOE_MIX(c->top_k);
    MOE_MIX(c->activation); MOE_MIX(c->dtype); MOE_MIX(c->gate); MOE_MIX(c->renormalize);
    MOE_MIX(c->noisy_gating); MOE_MIX(c->priority); MOE_MIX(c->expert_bias); MOE_MIX(c->seed);
    MOE_MIX(c->num_chunks); MOE_MIX(c->router);
    MOE_MIX(c->num_shared_experts); MOE_MIX(c->shared_d_ff); MOE_MIX(c->shared_expert_gate);
    {
        uint64_t bits;
        memcpy(&bits, &c->bias_update_rate, sizeof bits);
        MOE_MIX(bits);
    }
    double d[5] = {c->capacity_factor, c->switch_loss_coef, c->importance_loss_coef,
                   c->load_loss_coef, c->z_loss_coef};
    for (int i = 0; i < 5; ++i) {
        uint64_t bits;
        memcpy(&bits, &d[i], sizeof bits);
        MOE_MIX(bits);
    }
    /* routing extensions */
    MOE_MIX(c->score_func); MOE_MIX(c->num_groups); MOE_MIX(c->topk_group);
    MOE_MIX(c->group_score);
    {
        double r[2] = {c->routed_scaling_factor, c->expert_dropout};
        for (int i = 0; i < 2; ++i) {
            uint64_t bits;
            memcpy(&bits, &r[i], sizeof bits);
            MOE_MIX(bits);
        }
    }
#undef MOE_MIX
    return h;
}
