/* presets.c - moe_layer_config_preset: the routed-expert layer of named model families
 * (docs/presets.md says which HF transformers block each matches and where conventions differ). */
#include <string.h>

#include "core/status.h"
#include "moe/moe.h"

typedef struct preset {
    const char *name;
    int64_t d_model, d_ff, num_experts, top_k;
    moe_activation_t activation;
    moe_gate_t gate;
    int renormalize;
    moe_score_func_t score_func;
    double routed_scaling_factor;
    int64_t num_groups, topk_group;
    double capacity_factor;
    double switch_loss_coef; /* K x HF's router_aux_loss_coef (docs/presets.md) */
    double z_loss_coef;
    double bias_update_rate;
} preset_t;

static const preset_t kPresets[] = {
    /* Mixtral-8x7B: softmax, top-2, renormalised; router_aux_loss_coef 0.02 */
    {"mixtral", 4096, 14336, 8, 2, MOE_ACTIVATION_SWIGLU, MOE_GATE_SOFTMAX_OF_TOPK, 1,
     MOE_SCORE_SOFTMAX, 1.0, 0, 0, 0.0, 2 * 0.02, 0.0, 0.0},
    /* Qwen1.5-MoE-A2.7B (Qwen2MoeSparseMoeBlock): norm_topk_prob false; coef 0.001 */
    {"qwen2-moe", 2048, 1408, 60, 4, MOE_ACTIVATION_SWIGLU, MOE_GATE_TOPK_OF_SOFTMAX, 0,
     MOE_SCORE_SOFTMAX, 1.0, 0, 0, 0.0, 4 * 0.001, 0.0, 0.0},
    /* Qwen3-30B-A3B (Qwen3MoeSparseMoeBlock): norm_topk_prob true; coef 0.001 */
    {"qwen3-moe", 2048, 768, 128, 8, MOE_ACTIVATION_SWIGLU, MOE_GATE_TOPK_OF_SOFTMAX, 1,
     MOE_SCORE_SOFTMAX, 1.0, 0, 0, 0.0, 8 * 0.001, 0.0, 0.0},
    /* DeepSeek-V3 (DeepseekV3MoE): sigmoid, 8 groups keep 4 by top-2 sums, top-8,
     * renormalised, x 2.5; bias update speed 0.001 and sequence-wise alpha 1e-4 (the paper) */
    {"deepseek-v3", 7168, 2048, 256, 8, MOE_ACTIVATION_SWIGLU, MOE_GATE_SOFTMAX_OF_TOPK, 1,
     MOE_SCORE_SIGMOID, 2.5, 8, 4, 0.0, 1e-4, 0.0, 0.001},
    /* Switch-Base-8 (SwitchTransformersSparseMLP): top-1, gate = its softmax probability,
     * capacity factor 1, aux 0.001 (K = 1), z-loss 0.001, ReLU */
    {"switch", 768, 3072, 8, 1, MOE_ACTIVATION_RELU, MOE_GATE_TOPK_OF_SOFTMAX, 0,
     MOE_SCORE_SOFTMAX, 1.0, 0, 0, 1.0, 0.001, 0.001, 0.0},
    /* OLMoE-1B-7B (OlmoeSparseMoeBlock): norm_topk_prob false, top-8 of 64; coef 0.01 */
    {"olmoe", 2048, 1024, 64, 8, MOE_ACTIVATION_SWIGLU, MOE_GATE_TOPK_OF_SOFTMAX, 0,
     MOE_SCORE_SOFTMAX, 1.0, 0, 0, 0.0, 8 * 0.01, 0.0, 0.0},
};

moe_status_t moe_layer_config_preset(const char *name, moe_layer_config_t *cfg) {
    MOE_ARG(cfg != NULL, "cfg is NULL");
    MOE_ARG(name != NULL, "name is NULL (known presets: mixtral, qwen2-moe, qwen3-moe, "
                          "deepseek-v3, switch, olmoe)");
    const preset_t *p = NULL;
    for (size_t i = 0; i < sizeof kPresets / sizeof kPresets[0]; ++i)
        if (strcmp(name, kPresets[i].name) == 0) p = &kPresets[i];
    MOE_ARG(p != NULL,
            "name '%.64s' is not a known preset (mixtral, qwen2-moe, qwen3-moe, deepseek-v3, "
            "switch, olmoe)",
            name);
    moe_layer_config_t c = moe_layer_config_default();
    c.d_model = p->d_model;
    c.d_ff = p->d_ff;
    c.num_experts = p->num_experts;
    c.top_k = p->top_k;
    c.activation = p->activation;
    c.gate = p->gate;
    c.renormalize = p->renormalize;
    c.score_func = p->score_func;
    c.routed_scaling_factor = p->routed_scaling_factor;
    c.num_groups = p->num_groups;
    c.topk_group = p->topk_group;
    c.group_score = MOE_GROUP_SCORE_TOP2_SUM;
    c.capacity_factor = p->capacity_factor;
    c.priority = MOE_PRIORITY_POSITION;
    c.switch_loss_coef = p->switch_loss_coef;
    c.z_loss_coef = p->z_loss_coef;
    c.bias_update_rate = p->bias_update_rate;
    c.expert_bias = 0; /* none of these families has expert biases */
    *cfg = c;
    return MOE_STATUS_SUCCESS;
}
