/*
 * moe.h - the public C API of libmoe: one Mixture-of-Experts layer, forward and backward.
 *
 * This is the only header a user includes. Dimension letters used in every comment:
 *   T  tokens of one forward call on this rank      D  d_model
 *   E  experts (global)                             F  d_ff
 *   K  top_k (experts per token)                    E_local  experts owned by this rank
 *
 * Conventions
 *   - Every function returns a moe_status_t (or is a pure query). The library never exits, aborts
 *     or prints; on failure moe_last_error() gives a message naming the call, the argument and
 *     the file:line where the failure was found. A failed call leaves every handle usable.
 *   - Pointers passed to enqueueing calls are host pointers for MOE_BACKEND_CPU and device
 *     pointers for MOE_BACKEND_CUDA. `stream` is a cudaStream_t cast to void* (NULL = the legacy
 *     default stream); the CPU backend ignores it and completes the work before returning.
 *   - All arrays are row-major and contiguous.
 *   - Thread safety: distinct handles may be used from distinct threads concurrently. One handle
 *     (a context and the layers created on it) must not be used by two threads at once.
 *   - The exact math (routing, gates, losses, capacity, parameter init) is in docs/semantics.md.
 */
#ifndef MOE_MOE_H
#define MOE_MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0

#if defined(__GNUC__)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

/* ============================================================================================
 * Status, errors, version
 * ========================================================================================== */

typedef enum moe_status {
    MOE_STATUS_SUCCESS = 0,
    MOE_STATUS_INVALID_ARGUMENT = 1, /* a NULL pointer, a size out of range, a call out of order */
    MOE_STATUS_NOT_SUPPORTED = 2,    /* valid request this build or backend cannot serve */
    MOE_STATUS_ALLOC_FAILED = 3,     /* host or device allocation failed; nothing leaked */
    MOE_STATUS_NUMERIC_ERROR = 4,    /* NaN/Inf found in an input; nothing was routed */
    MOE_STATUS_BACKEND_ERROR = 5,    /* CUDA / cuBLAS / BLAS call failed */
    MOE_STATUS_COMM_ERROR = 6,       /* MPI / NCCL / peer failure */
    MOE_STATUS_INTERNAL_ERROR = 7    /* a bug in libmoe: please report with moe_last_error() */
} moe_status_t;

/* Name of a status ("MOE_STATUS_INVALID_ARGUMENT"); never NULL, "MOE_STATUS_UNKNOWN" for others. */
MOE_API const char *moe_status_string(moe_status_t status);

/* Message of the last failed call on this thread ("" if none). Thread-local; valid until the next
 * failing call on the same thread. */
MOE_API const char *moe_last_error(void);

/* Version of the library that is linked (not of this header). Any pointer may be NULL. */
MOE_API void moe_get_version(int *major, int *minor, int *patch);

/* ============================================================================================
 * Enumerations
 * ========================================================================================== */

typedef enum moe_backend { MOE_BACKEND_CPU = 0, MOE_BACKEND_CUDA = 1 } moe_backend_t;

/* Storage type of x, y, parameters and gradients. Accumulation is always f32. The CPU backend
 * supports F32 only (BF16/F16 give MOE_STATUS_NOT_SUPPORTED); the CUDA backend all three. */
typedef enum moe_dtype { MOE_DTYPE_F32 = 0, MOE_DTYPE_BF16 = 1, MOE_DTYPE_F16 = 2 } moe_dtype_t;

typedef enum moe_activation {
    MOE_ACTIVATION_RELU = 0,
    MOE_ACTIVATION_GELU = 1,  /* exact: 0.5 x (1 + erf(x / sqrt 2)) */
    MOE_ACTIVATION_SILU = 2,  /* x * sigmoid(x) */
    MOE_ACTIVATION_SWIGLU = 3 /* silu(gate) * up; W1 columns are [gate | up], 2F wide */
} moe_activation_t;

typedef enum moe_gate {
    MOE_GATE_SOFTMAX_OF_TOPK = 0, /* softmax over the K selected scores (Shazeer, Mixtral) */
    MOE_GATE_TOPK_OF_SOFTMAX = 1  /* softmax over all E, keep the K selected, optionally
                                     renormalised to sum 1 (GShard, Switch, DeepSeek) */
} moe_gate_t;

/* Order in which assignments claim capacity slots (only matters when capacity_factor > 0). */
typedef enum moe_priority {
    MOE_PRIORITY_POSITION = 0, /* all 1st choices in token order, then all 2nd choices, ... */
    MOE_PRIORITY_SCORE = 1     /* highest gate weight first, ties by position order */
} moe_priority_t;

/* ============================================================================================
 * Layer configuration
 * ========================================================================================== */

typedef struct moe_layer_config {
    size_t struct_size; /* sizeof(moe_layer_config_t): set by moe_layer_config_default() */
    int64_t d_model;     /* D */
    int64_t d_ff;        /* F: hidden width of each expert */
    int64_t num_experts; /* E (global, over all ranks) */
    int64_t top_k;       /* K, 1 <= K <= E */
    moe_activation_t activation;
    moe_dtype_t dtype;
    moe_gate_t gate;
    int renormalize;  /* TOPK_OF_SOFTMAX only: divide the K kept probabilities by their sum */
    int noisy_gating; /* Shazeer's noisy top-k in training: h = logits + eps * softplus(x Wn) */
    double capacity_factor; /* C = ceil(capacity_factor * T * K / E); <= 0 means dropless */
    moe_priority_t priority;
    double switch_loss_coef;     /* coefficient of the Switch load-balancing loss */
    double importance_loss_coef; /* coefficient of Shazeer's importance loss */
    double load_loss_coef;       /* coefficient of Shazeer's load loss */
    double z_loss_coef;          /* coefficient of the router z-loss */
    int expert_bias;             /* 1: experts have biases b1, b2; 0: no biases */
    uint64_t seed;               /* parameter init and gating noise */
} moe_layer_config_t;

/* Defaults: D 512, F 2048, E 8, K 2, GELU, F32, SOFTMAX_OF_TOPK, renormalize 1, noisy 0,
 * dropless (capacity_factor 0), POSITION priority, all loss coefs 0, expert_bias 1, seed 1234. */
MOE_API moe_layer_config_t moe_layer_config_default(void);

/* ============================================================================================
 * Communicator (expert parallelism). Declared here; constructors arrive with expert parallelism.
 * A NULL communicator everywhere means one rank.
 * ========================================================================================== */

typedef struct moe_comm moe_comm_t;

/* ============================================================================================
 * Context: one backend on one device (and, later, one rank of a communicator)
 * ========================================================================================== */

typedef struct moe_context moe_context_t;

/* Creates a context. backend: CPU or CUDA; device: CUDA device ordinal (ignored on CPU);
 * comm: NULL for one rank (the context does not take ownership of comm).
 * Returns NOT_SUPPORTED when the backend was not built in or no device is present. */
MOE_API moe_status_t moe_context_create(moe_context_t **ctx, moe_backend_t backend, int device,
                                        moe_comm_t *comm);

/* Destroys a context. Every layer created on it must be destroyed first (INVALID_ARGUMENT
 * otherwise, and nothing is freed). NULL is accepted and does nothing. */
MOE_API moe_status_t moe_context_destroy(moe_context_t *ctx);

/* Backend of a context (pure query; CPU for NULL). */
MOE_API moe_backend_t moe_context_backend(const moe_context_t *ctx);

/* ============================================================================================
 * Layer
 * ========================================================================================== */

typedef struct moe_layer moe_layer_t;

typedef enum moe_param {
    MOE_PARAM_ROUTER_WEIGHT = 0, /* Wg (D, E) */
    MOE_PARAM_NOISE_WEIGHT = 1,  /* Wn (D, E), only when noisy_gating */
    MOE_PARAM_W1 = 2,            /* (E_local, D, F), or (E_local, D, 2F) for SWIGLU: [gate | up] */
    MOE_PARAM_B1 = 3,            /* (E_local, F) or (E_local, 2F), only when expert_bias */
    MOE_PARAM_W2 = 4,            /* (E_local, F, D) */
    MOE_PARAM_B2 = 5,            /* (E_local, D), only when expert_bias */
    MOE_PARAM_COUNT = 6
} moe_param_t;

/* Creates a layer on ctx. The config is validated (INVALID_ARGUMENT naming the field); the
 * parameters are allocated on the context's backend and initialised from cfg->seed by the rule in
 * docs/semantics.md; gradients are zero. The layer keeps a pointer to ctx (not ownership). */
MOE_API moe_status_t moe_layer_create(moe_layer_t **layer, moe_context_t *ctx,
                                      const moe_layer_config_t *cfg);

/* Destroys a layer and frees everything it owns. NULL is accepted and does nothing. */
MOE_API moe_status_t moe_layer_destroy(moe_layer_t *layer);

/* Copy of the layer's (validated) config. */
MOE_API moe_status_t moe_layer_get_config(const moe_layer_t *layer, moe_layer_config_t *cfg);

/* Pointers to a parameter and its gradient, owned by the layer, in the layer's dtype, on the
 * context's backend (device pointers for CUDA). The user may read and write both (an optimizer
 * updates *value in place). value, grad, numel may each be NULL. A parameter that the config
 * turns off (NOISE_WEIGHT without noisy_gating, B1/B2 without expert_bias) gives NULL, NULL, 0
 * and SUCCESS. Pointers stay valid until the layer is destroyed. */
MOE_API moe_status_t moe_layer_param(moe_layer_t *layer, moe_param_t which, void **value,
                                     void **grad, int64_t *numel);

/* Forward: y = MoE(x). x, y: (num_tokens, D) in the layer's dtype. training != 0 turns on the
 * gating noise (when noisy_gating) and advances the forward-call counter that keys it.
 * num_tokens >= 1; buffers grow as needed (ALLOC_FAILED if they cannot, layer unchanged).
 * x is copied; the caller may reuse it after the call. NaN/Inf in x: NUMERIC_ERROR, y untouched,
 * nothing routed. Enqueued on stream (CUDA); complete on return (CPU). */
MOE_API moe_status_t moe_layer_forward(moe_layer_t *layer, const void *x, void *y,
                                       int64_t num_tokens, int training, void *stream);

/* Backward of the last successful forward: dy (num_tokens, D) in, dx (num_tokens, D) out
 * (overwritten). Every parameter gradient is accumulated (+=), including the gradients of the
 * aux losses times their coefs. INVALID_ARGUMENT if no forward has succeeded yet. May be called
 * more than once per forward (gradients accumulate again). */
MOE_API moe_status_t moe_layer_backward(moe_layer_t *layer, const void *dy, void *dx,
                                        void *stream);

/* Sets every parameter gradient to zero. */
MOE_API moe_status_t moe_layer_zero_grad(moe_layer_t *layer, void *stream);

typedef struct moe_routing_stats {
    int64_t num_tokens;      /* T of the last forward */
    int64_t num_assignments; /* T * K */
    int64_t num_dropped;     /* assignments dropped by capacity */
    double switch_loss;      /* unscaled loss values (before their coefs) */
    double importance_loss;
    double load_loss;
    double z_loss;
    double aux_loss;  /* sum of coef * loss: what backward differentiates */
    double imbalance; /* max over mean of tokens_per_expert */
} moe_routing_stats_t;

/* Routing statistics of the last forward (synchronises the layer's stream on CUDA).
 * tokens_per_expert (E): assignments routed to each expert before dropping; dropped_per_expert
 * (E): those dropped. Both arrays are host arrays and may be NULL. INVALID_ARGUMENT before the
 * first forward. */
MOE_API moe_status_t moe_layer_stats(moe_layer_t *layer, moe_routing_stats_t *stats,
                                     int64_t *tokens_per_expert, int64_t *dropped_per_expert);

/* Routing of the last forward, host arrays (num_tokens, K) in token order: chosen expert in
 * rank order of h (best first), its gate weight, and 1/0 whether it was kept (not dropped).
 * Any pointer may be NULL. */
MOE_API moe_status_t moe_layer_routing(moe_layer_t *layer, int32_t *expert_index, float *gate,
                                       int32_t *kept);

#ifdef __cplusplus
}
#endif

#endif /* MOE_MOE_H */
