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
    MOE_STATUS_NUMERIC_ERROR = 4,    /* NaN/Inf in an input (nothing was computed), or in an
                                        output of finite inputs (see "Numeric checks") */
    MOE_STATUS_BACKEND_ERROR = 5,    /* CUDA / cuBLAS / BLAS call failed */
    MOE_STATUS_COMM_ERROR = 6,       /* MPI / NCCL / peer failure */
    MOE_STATUS_INTERNAL_ERROR = 7,   /* a bug in libmoe: please report with moe_last_error() */
    MOE_STATUS_IO_ERROR = 8          /* a file could not be opened, written or closed (traces) */
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
    MOE_ACTIVATION_SWIGLU = 3, /* silu(gate) * up; W1 columns are [gate | up], 2F wide */
    MOE_ACTIVATION_IDENTITY = 4 /* act(v) = v: linear experts, x W1 W2 + (b1 W2 + b2), of rank
                                   <= min(D, F) (the classic mixture of linear experts) */
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

/* Who chooses. */
typedef enum moe_router_type {
    MOE_ROUTER_TOKEN_CHOICE = 0, /* each token picks its top_k experts */
    MOE_ROUTER_EXPERT_CHOICE = 1, /* each expert picks its top C tokens (Zhou et al. 2022) */
    MOE_ROUTER_HIERARCHICAL = 2   /* a primary gate picks topk_group of num_groups groups, each
                                     group's own secondary router picks top_k / topk_group of its
                                     experts; gate = product (Shazeer et al. 2017, appendix B) */
} moe_router_type_t;

/* Score function of the router (the routing extensions: docs/semantics.md). */
typedef enum moe_score_func {
    MOE_SCORE_SOFTMAX = 0, /* gates from a softmax (cfg.gate says which), as before */
    MOE_SCORE_SIGMOID = 1  /* s_e = sigmoid(h_e) per expert (DeepSeek-V3); cfg.gate is unused */
} moe_score_func_t;

/* Score of an expert group in group-limited gating. */
typedef enum moe_group_score {
    MOE_GROUP_SCORE_TOP2_SUM = 0, /* sum of the group's 2 best selection scores (DeepSeek-V3) */
    MOE_GROUP_SCORE_MAX = 1       /* the group's best selection score (DeepSeek-V2) */
} moe_group_score_t;

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
    int renormalize;  /* TOPK_OF_SOFTMAX, or SIGMOID scores: divide the K kept probabilities
                         (scores) by their sum */
    int noisy_gating; /* Shazeer's noisy top-k in training: h = logits + eps * softplus(x Wn) */
    double capacity_factor; /* C = ceil(capacity_factor * T * K / E); <= 0 means dropless */
    moe_priority_t priority;
    double switch_loss_coef;     /* coefficient of the Switch load-balancing loss; each loss
                                    coef is in [0, 1e6] (MOE_MAX_LOSS_COEF), so the aux-loss
                                    gradients stay inside the f32 range */
    double importance_loss_coef; /* coefficient of Shazeer's importance loss */
    double load_loss_coef;       /* coefficient of Shazeer's load loss */
    double z_loss_coef;          /* coefficient of the router z-loss */
    int expert_bias;             /* 1: experts have biases b1, b2; 0: no biases */
    uint64_t seed;               /* parameter init and gating noise */
    moe_router_type_t router; /* EXPERT_CHOICE: scores p = softmax(h) over E; expert e keeps the
                                 C = ceil(cf * T * top_k / E) tokens with the largest p[t, e]
                                 (cf = capacity_factor, or 1 when <= 0) with gate p[t, e]; a token
                                 gets 0..E experts. Implies gate TOPK_OF_SOFTMAX, renormalize 0,
                                 priority SCORE; routing arrays are (num_tokens, E) wide. */
    double bias_update_rate; /* > 0: auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3):
                                a per-expert bias b is added to h (to sigmoid(h) with
                                score_func SIGMOID) for the top-k selection only (gates use
                                the unbiased scores), and after every training forward
                                b_e += rate * sign(mean_e' load - load_e). Token choice, no noise. */
    int64_t num_chunks; /* expert parallelism: the expert side runs in this many chunks of
                           local experts (capped at the most experts one rank holds; 0 = the
                           default, MOE_DEFAULT_CHUNKS), each chunk's exchange posted before the previous
                           chunk's experts compute. No transport overlaps it yet (MPI does not
                           progress meanwhile; local and NCCL run in order, docs/expert-parallel.md).
                           Results do not depend on it. */

    /* ---- routing extensions: score function, group-limited gating, expert dropout
     * (docs/semantics.md "Routing extensions"). Token choice only; none of them combines with
     * noisy_gating (INVALID_ARGUMENT). ---- */
    moe_score_func_t score_func;  /* SOFTMAX (default) or SIGMOID; with SIGMOID the selection
                                     bias of bias_update_rate is added to sigmoid(h) */
    double routed_scaling_factor; /* > 0, default 1: every gate weight is multiplied by it */
    int64_t num_groups;           /* G: 0 or 1 = no groups; G > 1 divides num_experts, experts
                                     [g E/G, (g+1) E/G) form group g (hierarchical routing:
                                     see below) */
    int64_t topk_group;           /* G > 1: groups a token keeps, in [1, G], with
                                     topk_group * E / G >= top_k */
    moe_group_score_t group_score; /* how a group is ranked (G > 1) */
    double expert_dropout;        /* in [0, 1): in a training forward each expert is unavailable
                                     with this probability (at least top_k stay available) */

    /* ---- expert groups under hierarchical routing -----------------------------------------
     * MOE_ROUTER_HIERARCHICAL uses num_groups and topk_group above: the E experts form
     * num_groups = G groups of E / G consecutive experts (G >= 1 divides E); the primary router
     * Wg (D, G) picks topk_group = k1 groups (1 <= k1 <= G), group g's secondary router
     * (MOE_PARAM_SECONDARY_ROUTER_WEIGHT) picks k2 = top_k / k1 of its experts (top_k divisible
     * by k1, k2 <= E / G), so a token still has top_k experts. Gate modes apply at each level; no
     * gating noise, no selection bias. Losses: both levels' (docs/semantics.md). ---- */

    /* ---- shared experts (Qwen2-MoE, DeepSeek-V2/V3): always active, on every token ---- */
    int64_t num_shared_experts; /* S >= 0 experts that every token passes through, besides its
                                   routed ones: y += g_s(x) * sum_s FFN_s(x); same activation
                                   and expert_bias setting as the routed experts. 0 = none.
                                   With expert parallelism every rank holds all S (replicated,
                                   computed on its own tokens). */
    int64_t shared_d_ff;        /* hidden width of each shared expert; 0 = d_ff */
    int shared_expert_gate;     /* 1: g_s(x) = sigmoid(x . w_sg), w_sg (D, 1), as Qwen2-MoE's
                                   shared_expert_gate; 0: g_s = 1 (DeepSeek). Needs S > 0. */
} moe_layer_config_t;

#define MOE_DEFAULT_CHUNKS 2
#define MOE_MAX_LOSS_COEF 1e6   /* largest accepted loss coefficient */
#define MOE_MAX_BIAS_UPDATE_RATE 1e6 /* largest accepted bias_update_rate */
#define MOE_MAX_CHUNKS 16

/* Defaults: D 512, F 2048, E 8, K 2, GELU, F32, SOFTMAX_OF_TOPK, renormalize 1, noisy 0,
 * dropless (capacity_factor 0), POSITION priority, all loss coefs 0, expert_bias 1, seed 1234;
 * score_func SOFTMAX, routed_scaling_factor 1, no groups, group_score TOP2_SUM, no dropout;
 * no shared experts. */
MOE_API moe_layer_config_t moe_layer_config_default(void);

/* Fills *cfg with the routed-expert layer of a named model family: "mixtral", "qwen2-moe",
 * "qwen3-moe", "deepseek-v3", "switch", "olmoe" (docs/presets.md: which HF transformers block
 * each matches, its sizes, and where libmoe's conventions differ). Every field not named by the
 * preset keeps moe_layer_config_default()'s value; the caller may change any field afterwards
 * (e.g. smaller d_model / d_ff for tests). Unknown name: INVALID_ARGUMENT listing the known
 * names, *cfg unchanged. */
MOE_API moe_status_t moe_layer_config_preset(const char *name, moe_layer_config_t *cfg);

/* ============================================================================================
 * Communicator: expert parallelism over P ranks
 *
 * A layer created on a context with a communicator of P ranks spreads its E experts over the
 * ranks by its placement (below; by default rank r holds the contiguous range
 * [floor(r E/P), floor((r+1) E/P)), any E >= 1 on any P >= 1); every rank routes its own tokens,
 * rows travel to the experts' holders and back by all-to-all. Every rank of a communicator must
 * make the same sequence of collective calls: moe_layer_create, moe_layer_forward(_experts),
 * moe_layer_backward(_experts), moe_layer_allreduce_router_grads, moe_layer_set_expert_mask,
 * moe_layer_set_placement, moe_layer_reduce_replica_grads, moe_layer_rebalance,
 * moe_comm_barrier, moe_comm_destroy. A collective that waits longer than the communicator's
 * timeout for a peer returns MOE_STATUS_COMM_ERROR naming the missing ranks, and the
 * communicator is then unusable (destroy it).
 *
 * Agreement. Each of those layer calls opens with an agreement step (one all-gather of one
 * 64-bit word per rank: the call, a hash of the layer, the call's flags and the step count, and
 * the rank's own status) before any data moves:
 *  - a rank whose own checks fail (a NULL pointer, forced routing for another token count,
 *    NaN/Inf in x or dy, an invalid config or a dtype its backend refuses at create, a bad
 *    mask, placement or redundancy) returns its own status and message, and every other rank
 *    returns the same status at once with a message naming that rank ("rank 1 failed its own
 *    checks in moe_layer_forward"); nothing ran on any rank and the layers and the
 *    communicator stay usable;
 *  - ranks in different calls (one skips a forward, one calls backward twice, two layers, a
 *    training flag that differs) all return MOE_STATUS_COMM_ERROR naming the calls; nothing
 *    was exchanged and the communicator stays usable;
 *  - moe_layer_create (and moe_layer_set_placement) end with a second step: when an
 *    allocation fails on one rank, every rank's call fails and hands out nothing.
 * A rank that fails after the agreement step while peers may wait in one of the call's
 * collectives (ALLOC_FAILED, a backend or transport error), or whose collective fails, breaks
 * the communicator and tells its peers: over the local and MPI communicators their waits end
 * at once in MOE_STATUS_COMM_ERROR naming the rank and its reason; over NCCL they wait for
 * their timeout. The communicator is then unusable on every rank (destroy the layers,
 * contexts and communicators). A rank with an invalid layer or context handle cannot reach its
 * peers: they wait for their timeout. Under MPI, end the job with MPI_Abort after a
 * COMM_ERROR: a hung peer never reaches MPI_Finalize, where the others would wait for it.
 * One agreement step costs one all-gather of 8 bytes per call (it replaces the all-reduce
 * that checked x and dy for NaN/Inf).
 * ========================================================================================== */

typedef struct moe_comm moe_comm_t;

/* MPI: host buffers, CPU backend, any number of processes and machines. mpi_comm points to an
 * MPI_Comm (NULL = MPI_COMM_WORLD); the library duplicates it. MPI must be initialised by the
 * caller. NOT_SUPPORTED when libmoe was built without MPI. */
MOE_API moe_status_t moe_comm_create_mpi(moe_comm_t **comm, const void *mpi_comm);

/* NCCL: one GPU per rank, CUDA backend. The NCCL unique id is bootstrapped over MPI (mpi_comm
 * as above). NOT_SUPPORTED when built without NCCL or MPI. */
MOE_API moe_status_t moe_comm_create_nccl(moe_comm_t **comm, const void *mpi_comm);

/* NCCL from a communicator the caller already has: nccl_comm points to an ncclComm_t, which the
 * caller keeps owning (destroy it after moe_comm_destroy). */
MOE_API moe_status_t moe_comm_create_nccl_from(moe_comm_t **comm, const void *nccl_comm);

/* num_ranks ranks as threads of one process: comms[0..num_ranks) receive one communicator per
 * rank; each rank's thread creates its own context and layer with its communicator. Works with
 * either backend (CUDA: every rank may use the same GPU). */
MOE_API moe_status_t moe_comm_create_local(moe_comm_t **comms, int num_ranks);

/* Rank and size (pure queries; -1 for an invalid handle). */
MOE_API int moe_comm_rank(const moe_comm_t *comm);
MOE_API int moe_comm_size(const moe_comm_t *comm);

/* Collective wait time before a COMM_ERROR (default 300 s, or MOE_COMM_TIMEOUT_S from the
 * environment at creation). Local setting of this rank's handle. */
MOE_API moe_status_t moe_comm_set_timeout(moe_comm_t *comm, double seconds);

/* Collective: waits until every rank has called it. */
MOE_API moe_status_t moe_comm_barrier(moe_comm_t *comm);

/* Frees this rank's handle (not collective for local and MPI). NULL does nothing. Contexts
 * using the communicator must be destroyed first. */
MOE_API moe_status_t moe_comm_destroy(moe_comm_t *comm);

/* ============================================================================================
 * Context: one backend on one device, and optionally one rank of a communicator
 * ========================================================================================== */

typedef struct moe_context moe_context_t;

/* Creates a context. backend: CPU or CUDA; device: CUDA device ordinal (ignored on CPU);
 * comm: NULL for one rank, or this rank's communicator (not owned; MPI needs the CPU backend,
 * NCCL the CUDA backend, local either).
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
    MOE_PARAM_ROUTER_WEIGHT = 0, /* Wg (D, E); (D, num_groups) for MOE_ROUTER_HIERARCHICAL */
    MOE_PARAM_NOISE_WEIGHT = 1,  /* Wn (D, E), only when noisy_gating */
    MOE_PARAM_W1 = 2,            /* (E_local, D, F), or (E_local, D, 2F) for SWIGLU: [gate | up];
                                    E_local = this rank's slots of the placement, in placement
                                    order (ascending expert id) */
    MOE_PARAM_B1 = 3,            /* (E_local, F) or (E_local, 2F), only when expert_bias */
    MOE_PARAM_W2 = 4,            /* (E_local, F, D) */
    MOE_PARAM_B2 = 5,            /* (E_local, D), only when expert_bias */
    /* hierarchical routing: replicated on every rank like Wg */
    MOE_PARAM_SECONDARY_ROUTER_WEIGHT = 6, /* (num_groups, D, E / num_groups), only when router =
                                              HIERARCHICAL: group g's router */
    /* shared experts (only when num_shared_experts = S > 0; Fs = shared_d_ff or d_ff, Fs2 = 2 Fs
     * for SWIGLU, else Fs): replicated on every rank, never split over ranks */
    MOE_PARAM_SHARED_W1 = 7,    /* (S, D, Fs2), [gate | up] for SWIGLU */
    MOE_PARAM_SHARED_B1 = 8,    /* (S, Fs2), only when expert_bias */
    MOE_PARAM_SHARED_W2 = 9,    /* (S, Fs, D) */
    MOE_PARAM_SHARED_B2 = 10,   /* (S, D), only when expert_bias */
    MOE_PARAM_SHARED_GATE = 11, /* w_sg (D, 1), only when shared_expert_gate */
    MOE_PARAM_COUNT = 12
} moe_param_t;

/* Creates a layer on ctx. The config is validated (INVALID_ARGUMENT naming the field); the
 * parameters are allocated on the context's backend and initialised from cfg->seed by the rule in
 * docs/semantics.md; gradients are zero. The layer keeps a pointer to ctx (not ownership). */
MOE_API moe_status_t moe_layer_create(moe_layer_t **layer, moe_context_t *ctx,
                                      const moe_layer_config_t *cfg);

/* Destroys a layer and frees everything it owns. NULL is accepted and does nothing. Every
 * optimizer created on it must be destroyed first (INVALID_ARGUMENT otherwise, and nothing is
 * freed), as a context refuses while layers live. */
MOE_API moe_status_t moe_layer_destroy(moe_layer_t *layer);

/* Copy of the layer's (validated) config. */
MOE_API moe_status_t moe_layer_get_config(const moe_layer_t *layer, moe_layer_config_t *cfg);

/* Pointers to a parameter and its gradient, owned by the layer, in the layer's dtype, on the
 * context's backend (device pointers for CUDA). The user may read and write both (an optimizer
 * updates *value in place). value, grad, numel may each be NULL. A parameter that the config
 * turns off (NOISE_WEIGHT without noisy_gating, B1/B2 without expert_bias, the SHARED_* ones
 * without shared experts, SHARED_B1/B2 without expert_bias, SHARED_GATE without
 * shared_expert_gate) gives NULL, NULL, 0
 * and SUCCESS. Pointers stay valid until the layer is destroyed. */
MOE_API moe_status_t moe_layer_param(moe_layer_t *layer, moe_param_t which, void **value,
                                     void **grad, int64_t *numel);

/* Forward: y = MoE(x). x, y: (num_tokens, D) in the layer's dtype. training != 0 turns on the
 * gating noise (when noisy_gating) and advances the forward-call counter that keys it.
 * num_tokens >= 0 (0 is valid — with expert parallelism a rank may have no tokens and still
 * serves its experts; x and y may then be NULL); buffers grow as needed (ALLOC_FAILED if they
 * cannot, layer unchanged). Collective over the context's communicator.
 * x is copied; the caller may reuse it after the call. NaN/Inf in x: NUMERIC_ERROR, y untouched,
 * nothing routed; NaN/Inf in y from finite x: NUMERIC_ERROR after the whole forward ran (see
 * "Numeric checks"). Enqueued on stream (CUDA); complete on return (CPU). On CUDA the host waits
 * for the stream twice per forward: after the NaN/Inf count of x and after the gate (the
 * per-expert counts size the expert GEMMs), and a third time for the count of y unless
 * moe_layer_set_check_numerics(layer, 0); y is complete when the stream is. With shared
 * experts y includes them (docs/semantics.md), computed from x on this rank alone. */
MOE_API moe_status_t moe_layer_forward(moe_layer_t *layer, const void *x, void *y,
                                       int64_t num_tokens, int training, void *stream);

/* Backward of the last successful forward: dy (num_tokens, D) in, dx (num_tokens, D) out
 * (overwritten). Every parameter gradient is accumulated (+=), including the gradients of the
 * aux losses times their coefs. INVALID_ARGUMENT if no forward has succeeded yet. May be called
 * more than once per forward (gradients accumulate again). NaN/Inf in dy: NUMERIC_ERROR before
 * anything is accumulated; NaN/Inf in dx or a gradient: NUMERIC_ERROR after the backward ran
 * (see "Numeric checks"). */
MOE_API moe_status_t moe_layer_backward(moe_layer_t *layer, const void *dy, void *dx,
                                        void *stream);

/* ---- per-expert outputs (unfused combine) ----
 * The same layer with the combine left to the caller, for losses that need each expert's own
 * output (the competitive mixture of Jacobs et al. 1991, docs/competitive-moe.md). W =
 * moe_layer_routing_width. Forward: y_experts (num_tokens, W, D) in the layer's dtype receives,
 * for each token t and assignment j (best first, as moe_layer_routing), FFN_{idx_j}(x[t]), and
 * gate (num_tokens, W, f32) its gate weight g[t, j]; a dropped assignment (capacity; for expert
 * choice every expert that did not choose the token) gives a zero row and gate 0. Then
 * sum_j gate[t, j] y_experts[t, j] is what moe_layer_forward returns. Everything else is as
 * moe_layer_forward (routing, stats, aux losses, noise counter, traces, the host waits); both
 * arrays are backend memory. A layer with shared experts: NOT_SUPPORTED (they have no place in
 * the per-assignment rows). */
MOE_API moe_status_t moe_layer_forward_experts(moe_layer_t *layer, const void *x,
                                               void *y_experts, float *gate,
                                               int64_t num_tokens, int training, void *stream);

/* Backward of the last successful forward (either kind) from the gradients of the per-expert
 * outputs: dy_experts (num_tokens, W, D) in the layer's dtype and dgate (num_tokens, W, f32);
 * dx (num_tokens, D) out (overwritten). The entries of dropped assignments are ignored (their
 * outputs are constants). Every parameter gradient is accumulated (+=) as by
 * moe_layer_backward, the aux losses' included: the gate gradient flows into the router as in
 * the fused path. With dy_experts[t, j] = g[t, j] dy[t] and dgate[t, j] = <dy[t],
 * y_experts[t, j]> it computes what moe_layer_backward(dy) does. */
MOE_API moe_status_t moe_layer_backward_experts(moe_layer_t *layer, const void *dy_experts,
                                                const float *dgate, void *dx, void *stream);

/* Width of the routing arrays (moe_layer_routing, moe_layer_force_routing, traces): top_k for
 * token choice and hierarchical routing, num_experts for expert choice. Pure query; 0 for an
 * invalid handle. */
MOE_API int64_t moe_layer_routing_width(const moe_layer_t *layer);

/* The per-expert selection bias of auxiliary-loss-free balancing (E floats, host), read or
 * replaced (e.g. to restore a checkpoint). Zero at creation; only used when
 * bias_update_rate > 0. */
MOE_API moe_status_t moe_layer_score_bias(const moe_layer_t *layer, float *bias);
MOE_API moe_status_t moe_layer_set_score_bias(moe_layer_t *layer, const float *bias);

/* Expert availability (docs/semantics.md "Routing extensions"). mask: E bytes, host, 1 = the
 * expert may be selected, 0 = it is never selected and receives no rows (pruning, fault
 * experiments); NULL makes every expert available again. At least top_k experts must be
 * available. Applies from the next forward on; not allowed with noisy_gating or expert choice
 * (INVALID_ARGUMENT) unless every entry is 1. Collective with expert parallelism: every rank
 * must pass the same mask (INVALID_ARGUMENT on every rank otherwise, nothing changed). */
MOE_API moe_status_t moe_layer_set_expert_mask(moe_layer_t *layer, const uint8_t *mask);

/* The mask set by moe_layer_set_expert_mask (E bytes, host; all 1 at creation). */
MOE_API moe_status_t moe_layer_expert_mask(const moe_layer_t *layer, uint8_t *mask);

/* Availability of every expert in the last forward (E bytes, host): the mask and, in a training
 * forward with expert_dropout > 0, this call's dropout draw. *num_available (may be NULL) gets
 * their count. INVALID_ARGUMENT before the first forward. */
MOE_API moe_status_t moe_layer_expert_availability(const moe_layer_t *layer, uint8_t *available,
                                                   int64_t *num_available);

/* Sums the gradients of the replicated parameters over the ranks of the context's communicator,
 * in place, so that they stay equal on every rank after an optimizer step: the router and noise
 * weights, the secondary routers of hierarchical routing, and every shared-expert parameter
 * (MOE_PARAM_SHARED_*), each computed by a rank from its own tokens. Off unless called; a no-op
 * on one rank. Collective. f32 storage only. Routed expert weights are owned by one rank and
 * need no reduction. (The name predates shared experts.) */
MOE_API moe_status_t moe_layer_allreduce_router_grads(moe_layer_t *layer, void *stream);

/* ============================================================================================
 * Expert placement and replication (docs/expert-parallel.md)
 *
 * A placement says which rank holds which experts: num_local[q] (P entries, the communicator's
 * size) experts for rank q, listed in experts[] rank after rank (sum num_local entries), each
 * rank's list strictly ascending. Every expert must be held by at least one rank; a rank may
 * hold none. An expert held by m > 1 ranks is replicated: each source rank cuts its kept rows of
 * that expert (n of them, in route order) into m consecutive parts, part i = rows
 * [floor(i n / m), floor((i + 1) n / m)), and sends part i to the ((i + rank) mod m)-th holder
 * (holders in rank order), so every replica gets n / m of every source's rows, +-1.
 * moe_layer_param gives a rank's experts in its placement order: slot le of W1/B1/W2/B2 is
 * expert experts[rank_begin + le]. Replicas start equal (the init rule indexes experts
 * globally) and stay equal when their gradients are summed (moe_layer_reduce_replica_grads)
 * before every optimizer step.
 * ========================================================================================== */

typedef struct moe_optimizer moe_optimizer_t; /* declared again with the optimizer below */

/* Collective: sets the layer's placement (same arguments on every rank, checked: a rank that
 * differs gets INVALID_ARGUMENT naming the rank). Validated: num_local[q] in [0, E], ids in
 * [0, E), ascending per rank, every expert placed (INVALID_ARGUMENT naming what is wrong; the
 * layer is unchanged). Each rank's experts' parameters and gradients move to their new holders
 * by the communicator (a new slot takes its expert from the same rank when it held it, else
 * from the lowest rank that held it), and so do the moment buffers of opt when given (the
 * layer's optimizer, on every rank or on none; NULL: the optimizer must not be stepped again on
 * this layer). Call it between steps, e.g. before the first forward or after an optimizer
 * step: the last forward can no longer be differentiated (backward needs a new forward), and
 * the pointers of moe_layer_param and E_local change. With one rank the only placement is every
 * expert once. Host arrays. */
MOE_API moe_status_t moe_layer_set_placement(moe_layer_t *layer, const int64_t *num_local,
                                             const int32_t *experts, moe_optimizer_t *opt);

/* The layer's placement: num_local (P) and experts (num_slots entries), either may be NULL;
 * *num_slots (may be NULL) the number of slots, E plus the replicas. Pure query. */
MOE_API moe_status_t moe_layer_get_placement(const moe_layer_t *layer, int64_t *num_local,
                                             int32_t *experts, int64_t *num_slots);

/* Collective: sums the expert gradients (W1, B1, W2, B2) of every replicated expert over the
 * ranks that hold it, in place, so that every replica holds the gradient of all the expert's
 * rows, as the single-rank layer would. Each holder receives the others' gradients through the
 * communicator and adds them on the host in rank order, the same operations on every holder, so
 * the replicas' gradients (and weights after a step) stay bitwise equal. Call it after the last
 * backward and before moe_optimizer_step; a no-op without replicas or on one rank. f32 storage
 * (INVALID_ARGUMENT otherwise). Synchronises the stream. */
MOE_API moe_status_t moe_layer_reduce_replica_grads(moe_layer_t *layer, void *stream);

/* The running load: assignments per expert (E doubles, global counts, before dropping) summed
 * over the forwards since creation or the last reset (reset != 0 zeroes it after the read;
 * load may be NULL). Pure host state. */
MOE_API moe_status_t moe_layer_expert_load(moe_layer_t *layer, double *load, int reset);

/* Collective online re-planning: a placement from the running load (moe_plan_placement with
 * the communicator's size and `redundant` extra slots), set by moe_layer_set_placement (moving
 * the experts' state and opt's moments), then the running load reset. Every rank holds the
 * same global counts, so every rank plans the same placement. *imbalance_before (the current
 * placement under the same load) and *imbalance_after (the planned one), max over mean rank
 * load, may be NULL. Call it every N steps between an optimizer step and the next forward. */
MOE_API moe_status_t moe_layer_rebalance(moe_layer_t *layer, int64_t redundant,
                                         moe_optimizer_t *opt, double *imbalance_before,
                                         double *imbalance_after);

/* The placement planner, a pure function: from per-expert loads load (E, finite, >= 0), P
 * ranks and up to `redundant` extra slots (0 .. (P - 1) E), a placement of E + r slots, r <=
 * redundant (num_local (P), experts (room for E + redundant entries)), that keeps the largest
 * rank load small, the load of a replica being load / replicas. Algorithm
 * (docs/expert-parallel.md): replicas to the largest load per replica one at a time (as
 * DeepSeek's EPLB); longest-first list scheduling to the least loaded rank with a free slot (at
 * most ceil(slots / P) per rank) that does not hold the expert yet; swaps that lower the most
 * loaded rank; this for several replica counts r <= redundant, the best kept. Deterministic.
 * *imbalance (may be NULL) is the planned max over mean rank load (1 when every load is 0). */
MOE_API moe_status_t moe_plan_placement(const double *load, int64_t num_experts, int ranks,
                                        int64_t redundant, int64_t *num_local, int32_t *experts,
                                        double *imbalance);

/* Max over mean rank load of a placement (validated as moe_layer_set_placement does) under
 * per-expert loads, each replica taking load / replicas. */
MOE_API moe_status_t moe_placement_imbalance(const double *load, int64_t num_experts, int ranks,
                                             const int64_t *num_local, const int32_t *experts,
                                             double *imbalance);

/* Sets every parameter gradient to zero. */
MOE_API moe_status_t moe_layer_zero_grad(moe_layer_t *layer, void *stream);

/* With expert parallelism every count and loss is global: summed over the ranks' tokens. */
typedef struct moe_routing_stats {
    int64_t num_tokens;      /* T of the last forward (all ranks) */
    int64_t num_assignments; /* T * K */
    int64_t num_dropped;     /* assignments dropped by capacity */
    double switch_loss;      /* unscaled loss values (before their coefs) */
    double importance_loss;
    double load_loss;
    double z_loss;
    double aux_loss;  /* sum of coef * loss: what backward differentiates */
    double imbalance; /* max over mean of tokens_per_expert */
    int64_t rows_sent;     /* this rank: kept rows sent to experts (own rank included) */
    int64_t rows_received; /* this rank: rows its experts received from all ranks */
    /* hierarchical routing: each level's unscaled losses, [0] the primary level (over groups),
     * [1] the secondary level (within groups); switch_loss ... z_loss above are their sums.
     * Zero for the other routers. */
    double level_switch_loss[2];
    double level_importance_loss[2];
    double level_load_loss[2];
    double level_z_loss[2];
} moe_routing_stats_t;

/* Routing statistics of the last forward (synchronises the layer's stream on CUDA); which
 * experts were available in it (mask, expert dropout): moe_layer_expert_availability.
 * tokens_per_expert (E): assignments routed to each expert before dropping; dropped_per_expert
 * (E): those dropped. Both arrays are host arrays and may be NULL. INVALID_ARGUMENT before the
 * first forward. */
MOE_API moe_status_t moe_layer_stats(moe_layer_t *layer, moe_routing_stats_t *stats,
                                     int64_t *tokens_per_expert, int64_t *dropped_per_expert);

/* Routing of this rank's tokens in the last forward, host arrays (num_tokens, W) in token order,
 * W = moe_layer_routing_width (top_k; num_experts for expert choice): chosen expert in rank
 * order of h (best first; hierarchical routing: the best group's experts first, each group's
 * best first), its gate weight, and 1/0 whether it was kept (not dropped).
 * Any pointer may be NULL. */
MOE_API moe_status_t moe_layer_routing(moe_layer_t *layer, int32_t *expert_index, float *gate,
                                       int32_t *kept);

/* ============================================================================================
 * Numeric checks
 *
 * Inputs: NaN/Inf in x (forward) or in dy (backward; dy_experts for moe_layer_backward_experts)
 * gives NUMERIC_ERROR before anything is
 * computed: the forward routes nothing (the last forward stays readable), the backward
 * accumulates nothing. With expert parallelism every rank returns NUMERIC_ERROR when any rank's
 * input holds one (one all-reduce of a count per forward and per backward). Always on.
 * Outputs: finite inputs can still give non-finite results (x near FLT_MAX, huge or non-finite
 * parameters written through moe_layer_param, huge forced gates). After a forward the layer
 * counts NaN/Inf in y (T, D) (moe_layer_forward_experts: in the per-expert rows (T, W, D)); after
 * a backward in dx (T, D) and then in every parameter gradient
 * (all of it, accumulated over the backwards since the last zero_grad). A non-finite value gives
 * NUMERIC_ERROR naming the output; the call ran to the end and nothing is undone: y or dx and the
 * gradients hold what was computed, the routing, stats and trace record are this forward's, a
 * backward may follow the forward, and the layer stays usable (moe_layer_zero_grad clears the
 * gradients; moe_optimizer_step refuses non-finite gradients anyway). Each rank checks its own
 * outputs. Cost: one pass over y, dx and the gradients per call on the backend (the CPU backend
 * reads them once; on CUDA each count is a reduction kernel plus one host wait for its result,
 * i.e. one wait after every forward and 1 + (parameters present) waits after every backward,
 * besides the syncs named at moe_layer_forward).
 * ========================================================================================== */

/* Turns the output checks (y, dx, gradients) on (enable != 0, the default) or off. The input
 * checks of x and dy stay on. Local to this layer and rank. */
MOE_API moe_status_t moe_layer_set_check_numerics(moe_layer_t *layer, int enable);

/* ============================================================================================
 * Routing traces and replay (format: docs/trace.md)
 * ========================================================================================== */

/* Starts writing a routing trace: after every successful forward the layer appends one record
 * (token count, K, expert indices, gate weights, kept flags, per-expert counts and drops) to the
 * file at path, which is created or truncated and gets the versioned header. layer_id tags the
 * records so several layers may share a program (one file per layer and rank). The file layout
 * is moe/trace_format.h. A file that cannot be created, or whose header cannot be written,
 * returns MOE_STATUS_IO_ERROR. When records are written: each at the end of the forward that
 * made it (after y is complete, also when the output check then reports NUMERIC_ERROR), with one
 * unbuffered write, so it is in the file when the forward returns. A forward whose record cannot
 * be written (full disk, file size limit) returns MOE_STATUS_IO_ERROR; its results are valid and
 * only its record is lost: the file is cut back to the end of the last complete record (where
 * the file system allows) and the trace stays open, so later forwards append again (their step
 * numbers show the gap) or fail the same way. */
MOE_API moe_status_t moe_layer_trace_open(moe_layer_t *layer, const char *path,
                                          uint32_t layer_id);

/* Flushes and closes the trace (also done by moe_layer_destroy). NULL-safe on a layer without
 * an open trace. MOE_STATUS_IO_ERROR when the final flush or close fails. */
MOE_API moe_status_t moe_layer_trace_close(moe_layer_t *layer);

/* Replays recorded routing: the next forward (which must have num_tokens tokens) uses these
 * expert indices and gate weights, host arrays (num_tokens, K), instead of the router's choice;
 * capacity and drops then follow the layer's own config. The router still runs (its cost is
 * part of the layer) and its losses are reported, computed from the forced assignment counts.
 * One-shot: later forwards route normally. Backward through a forced forward computes the expert
 * and combine gradients; the router receives no gradient from the forced gates.
 * Cancelling: expert_index = gate = NULL with num_tokens = 0 drops a pending forced routing
 * (SUCCESS also when none is pending); with non-NULL arrays, num_tokens = 0 forces the routing
 * of a forward of 0 tokens. Any moe_layer_forward or moe_layer_forward_experts on this layer
 * that does not return SUCCESS (a token count other than num_tokens, an argument error, NaN/Inf
 * in x, ALLOC_FAILED, ...) also drops it: the next forward routes normally unless forced again.
 * NOT_SUPPORTED for router = MOE_ROUTER_HIERARCHICAL. */
MOE_API moe_status_t moe_layer_force_routing(moe_layer_t *layer, const int32_t *expert_index,
                                             const float *gate, int64_t num_tokens);

/* ============================================================================================
 * Phase timing
 * ========================================================================================== */

typedef enum moe_phase {
    MOE_PHASE_GATE = 0,       /* router GEMMs, noise, top-k, gates, loss sums */
    MOE_PHASE_ROUTE,          /* aux-loss reduction, slot assignment */
    MOE_PHASE_PERMUTE,        /* gather into the expert-major buffer */
    MOE_PHASE_DISPATCH,       /* counts + rows to the experts' ranks, regroup */
    MOE_PHASE_EXPERTS,        /* expert FFNs */
    MOE_PHASE_RETURN,         /* rows back to the tokens' ranks */
    MOE_PHASE_COMBINE,        /* weighted sum into y, then the shared experts (if any) */
    MOE_PHASE_BWD_COMBINE,    /* dgate and the per-row dY (and the shared experts' dY) */
    MOE_PHASE_BWD_DISPATCH,   /* dY rows to the experts' ranks */
    MOE_PHASE_BWD_EXPERTS,    /* expert weight gradients and dX rows */
    MOE_PHASE_BWD_RETURN,     /* dX rows back */
    MOE_PHASE_BWD_UNPERMUTE,  /* dx from the dX rows */
    MOE_PHASE_BWD_GATE,       /* gate, aux-loss and noise-network backward, router GEMMs,
                                 then the shared experts' backward (if any) */
    MOE_PHASE_COUNT
} moe_phase_t;

/* Turns per-phase timing on or off (off by default). When on, the scheduler waits for the
 * stream at the end of every phase so that wall-clock times are exact on both backends (the
 * extra host waits cost time on CUDA: use it to see where time goes, not for peak throughput). */
MOE_API moe_status_t moe_layer_set_profiling(moe_layer_t *layer, int enable);

/* Seconds spent in each phase by the last forward (forward phases) and the last backward
 * (backward phases); seconds has MOE_PHASE_COUNT entries. Zero for phases not measured
 * (profiling off, or the phase did not run). */
MOE_API moe_status_t moe_layer_phase_times(const moe_layer_t *layer, double *seconds);

/* Name of a phase ("gate", "dispatch", "bwd_experts", ...); "unknown" for others. */
MOE_API const char *moe_phase_name(moe_phase_t phase);

/* ============================================================================================
 * Optimizer: updates every parameter of one layer from its gradient, on the layer's backend
 *
 * Per element, with p a parameter, g its gradient, t the step number (1 for the first step) and
 * lr, momentum, beta1, beta2, eps, wd the config's fields (math in double for the scalars, f32
 * per element; moment buffers are f32, zero at creation):
 *   SGD:    g' = g + wd*p;  with momentum > 0: b = g' on the first step, else
 *           b = momentum*b + g';  d = nesterov ? g' + momentum*b : b;  without momentum d = g'.
 *           p -= lr*d                                              (as torch.optim.SGD)
 *   ADAM:   g' = g + wd*p   (L2 folded into the gradient)          (as torch.optim.Adam)
 *   ADAMW:  p -= lr*wd*p    (decoupled decay, before the moment update; g' = g)
 *                                                                  (as torch.optim.AdamW)
 *   ADAM/ADAMW then:  m = beta1*m + (1-beta1)*g';  v = beta2*v + (1-beta2)*g'^2;
 *           p -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * ========================================================================================== */

typedef enum moe_optimizer_kind {
    MOE_OPTIMIZER_SGD = 0,  /* SGD with optional (Nesterov) momentum and L2 weight decay */
    MOE_OPTIMIZER_ADAM = 1, /* Adam (Kingma & Ba) with L2 weight decay */
    MOE_OPTIMIZER_ADAMW = 2 /* Adam with decoupled weight decay (Loshchilov & Hutter) */
} moe_optimizer_kind_t;

typedef struct moe_optimizer_config {
    size_t struct_size; /* sizeof(moe_optimizer_config_t): set by moe_optimizer_config_default() */
    moe_optimizer_kind_t kind;
    double lr;           /* learning rate, finite and >= 0 */
    double momentum;     /* SGD only, in [0, 1) */
    int nesterov;        /* SGD only: Nesterov momentum (needs momentum > 0) */
    double beta1, beta2; /* ADAM/ADAMW only, each in [0, 1) */
    double eps;          /* ADAM/ADAMW only, > 0 */
    double weight_decay; /* >= 0: L2 for SGD and ADAM, decoupled for ADAMW */
} moe_optimizer_config_t;

/* Defaults for a kind (the values torch.optim uses): SGD lr 1e-2, momentum 0.9, nesterov 0;
 * ADAM lr 1e-3, beta1 0.9, beta2 0.999, eps 1e-8; ADAMW the same as ADAM. weight_decay 0 for
 * SGD and ADAM, 1e-2 for ADAMW. A kind that is not a moe_optimizer_kind_t gives the SGD
 * defaults with that kind stored, which moe_optimizer_create then rejects. */
MOE_API moe_optimizer_config_t moe_optimizer_config_default(moe_optimizer_kind_t kind);

typedef struct moe_optimizer moe_optimizer_t;

/* Creates an optimizer for every parameter of layer (those the config turns off are skipped).
 * The config is validated (INVALID_ARGUMENT naming the field); moment buffers are allocated on
 * the layer's backend (ALLOC_FAILED, nothing leaked) and zeroed. The optimizer keeps a pointer
 * to layer, not ownership: moe_layer_destroy refuses while the optimizer lives (destroy the
 * optimizer first). f32 parameters only, on the CPU and CUDA backends alike (the same per-element code; steps enqueue on `stream` on CUDA);
 * 16-bit parameters give NOT_SUPPORTED (keep f32 master weights yourself). */
MOE_API moe_status_t moe_optimizer_create(moe_optimizer_t **opt, moe_layer_t *layer,
                                          const moe_optimizer_config_t *cfg);

/* One update of every parameter from its current gradient (formulas above). The gradients are
 * read, not zeroed: call moe_layer_zero_grad before the next backward. When any gradient holds
 * NaN/Inf, NUMERIC_ERROR and nothing is updated (parameters, moments and the step count are
 * unchanged), so a caller can skip the step. Enqueued on stream (CUDA); complete on return
 * (CPU). */
MOE_API moe_status_t moe_optimizer_step(moe_optimizer_t *opt, void *stream);

/* Sets the learning rate of the following steps (finite and >= 0), for schedules. */
MOE_API moe_status_t moe_optimizer_set_lr(moe_optimizer_t *opt, double lr);

/* Copy of the optimizer's config (with the current lr); *num_steps (may be NULL) is the count of
 * successful steps so far. */
MOE_API moe_status_t moe_optimizer_get_config(const moe_optimizer_t *opt,
                                              moe_optimizer_config_t *cfg, int64_t *num_steps);

/* Destroys an optimizer and frees its moment buffers. NULL is accepted and does nothing. */
MOE_API moe_status_t moe_optimizer_destroy(moe_optimizer_t *opt);

#ifdef __cplusplus
}
#endif

#endif /* MOE_MOE_H */
