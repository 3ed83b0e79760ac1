"""_lib.py - the C ABI of libmoe as ctypes: finding libmoe.so, the structs and the prototypes.

Nothing here is compiled: the shared library is the ABI. Struct layouts mirror
include/moe/moe.h field by field; their struct_size is checked against the library at load time.
"""
import ctypes
import os
from ctypes import (POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int32,
                    c_int64, c_size_t, c_uint8, c_uint64, c_void_p)

# ---- enumerations (values of moe.h) ---------------------------------------------------------

STATUS_NAMES = {
    0: "MOE_STATUS_SUCCESS",
    1: "MOE_STATUS_INVALID_ARGUMENT",
    2: "MOE_STATUS_NOT_SUPPORTED",
    3: "MOE_STATUS_ALLOC_FAILED",
    4: "MOE_STATUS_NUMERIC_ERROR",
    5: "MOE_STATUS_BACKEND_ERROR",
    6: "MOE_STATUS_COMM_ERROR",
    7: "MOE_STATUS_INTERNAL_ERROR",
    8: "MOE_STATUS_IO_ERROR",
}
BACKENDS = {"cpu": 0, "cuda": 1}
DTYPES = {"f32": 0, "bf16": 1, "f16": 2}
ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "swiglu": 3, "identity": 4}
GATES = {"softmax_of_topk": 0, "topk_of_softmax": 1}
PRIORITIES = {"position": 0, "score": 1}
ROUTERS = {"token_choice": 0, "expert_choice": 1, "hierarchical": 2}
OPTIMIZERS = {"sgd": 0, "adam": 1, "adamw": 2}
SCORE_FUNCS = {"softmax": 0, "sigmoid": 1}
GROUP_SCORES = {"top2_sum": 0, "max": 1}
PARAMS = {"router_weight": 0, "noise_weight": 1, "w1": 2, "b1": 3, "w2": 4, "b2": 5,
          "secondary_router_weight": 6, "shared_w1": 7, "shared_b1": 8, "shared_w2": 9,
          "shared_b2": 10, "shared_gate": 11}

# ---- structs ----------------------------------------------------------------------------------


class LayerConfig(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("d_model", c_int64),
        ("d_ff", c_int64),
        ("num_experts", c_int64),
        ("top_k", c_int64),
        ("activation", c_int),
        ("dtype", c_int),
        ("gate", c_int),
        ("renormalize", c_int),
        ("noisy_gating", c_int),
        ("capacity_factor", c_double),
        ("priority", c_int),
        ("switch_loss_coef", c_double),
        ("importance_loss_coef", c_double),
        ("load_loss_coef", c_double),
        ("z_loss_coef", c_double),
        ("expert_bias", c_int),
        ("seed", c_uint64),
        ("router", c_int),
        ("bias_update_rate", c_double),
        ("num_chunks", c_int64),
        # routing extensions: score function, group-limited gating (and the groups of
        # hierarchical routing), expert dropout
        ("score_func", c_int),
        ("routed_scaling_factor", c_double),
        ("num_groups", c_int64),
        ("topk_group", c_int64),
        ("group_score", c_int),
        ("expert_dropout", c_double),
        # shared experts
        ("num_shared_experts", c_int64),
        ("shared_d_ff", c_int64),
        ("shared_expert_gate", c_int),
    ]


class RoutingStats(Structure):
    _fields_ = [
        ("num_tokens", c_int64),
        ("num_assignments", c_int64),
        ("num_dropped", c_int64),
        ("switch_loss", c_double),
        ("importance_loss", c_double),
        ("load_loss", c_double),
        ("z_loss", c_double),
        ("aux_loss", c_double),
        ("imbalance", c_double),
        ("rows_sent", c_int64),
        ("rows_received", c_int64),
        # hierarchical routing: [primary, secondary] level losses
        ("level_switch_loss", c_double * 2),
        ("level_importance_loss", c_double * 2),
        ("level_load_loss", c_double * 2),
        ("level_z_loss", c_double * 2),
    ]


class OptimizerConfig(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("kind", c_int),
        ("lr", c_double),
        ("momentum", c_double),
        ("nesterov", c_int),
        ("beta1", c_double),
        ("beta2", c_double),
        ("eps", c_double),
        ("weight_decay", c_double),
    ]


# ---- finding and loading the library -----------------------------------------------------------

_LIB_NAMES = ("libmoe.so", "libmoe.so.0", "libmoe.dylib")


def _candidates():
    """Where libmoe.so is looked for, in order: $LIBMOE_PATH (a file or a directory), next to
    this package, then the build/ directory of the source tree this package sits in."""
    out = []
    env = os.environ.get("LIBMOE_PATH")
    if env:
        if os.path.isdir(env):
            out += [os.path.join(env, n) for n in _LIB_NAMES]
        else:
            out.append(env)
    here = os.path.dirname(os.path.abspath(__file__))
    out += [os.path.join(here, n) for n in _LIB_NAMES]
    repo = os.path.dirname(os.path.dirname(here))
    out += [os.path.join(repo, "build", n) for n in _LIB_NAMES]
    return out


def _declare(lib):
    P = POINTER
    protos = {
        "moe_status_string": (c_char_p, [c_int]),
        "moe_last_error": (c_char_p, []),
        "moe_get_version": (None, [P(c_int), P(c_int), P(c_int)]),
        "moe_layer_config_default": (LayerConfig, []),
        "moe_context_create": (c_int, [P(c_void_p), c_int, c_int, c_void_p]),
        "moe_context_destroy": (c_int, [c_void_p]),
        "moe_context_backend": (c_int, [c_void_p]),
        "moe_layer_create": (c_int, [P(c_void_p), c_void_p, P(LayerConfig)]),
        "moe_layer_destroy": (c_int, [c_void_p]),
        "moe_layer_get_config": (c_int, [c_void_p, P(LayerConfig)]),
        "moe_layer_param": (c_int, [c_void_p, c_int, P(c_void_p), P(c_void_p), P(c_int64)]),
        "moe_layer_forward": (c_int, [c_void_p, c_void_p, c_void_p, c_int64, c_int, c_void_p]),
        "moe_layer_backward": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p]),
        "moe_layer_zero_grad": (c_int, [c_void_p, c_void_p]),
        "moe_layer_set_check_numerics": (c_int, [c_void_p, c_int]),
        "moe_layer_forward_experts": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p, c_int64,
                                              c_int, c_void_p]),
        "moe_layer_backward_experts": (c_int, [c_void_p, c_void_p, c_void_p, c_void_p,
                                               c_void_p]),
        "moe_layer_stats": (c_int, [c_void_p, P(RoutingStats), P(c_int64), P(c_int64)]),
        "moe_layer_routing": (c_int, [c_void_p, P(c_int32), P(c_float), P(c_int32)]),
        "moe_layer_routing_width": (c_int64, [c_void_p]),
        "moe_layer_score_bias": (c_int, [c_void_p, P(c_float)]),
        "moe_layer_config_preset": (c_int, [c_char_p, P(LayerConfig)]),
        "moe_layer_set_expert_mask": (c_int, [c_void_p, P(c_uint8)]),
        "moe_layer_expert_mask": (c_int, [c_void_p, P(c_uint8)]),
        "moe_layer_expert_availability": (c_int, [c_void_p, P(c_uint8), P(c_int64)]),
        "moe_optimizer_config_default": (OptimizerConfig, [c_int]),
        "moe_optimizer_create": (c_int, [P(c_void_p), c_void_p, P(OptimizerConfig)]),
        "moe_optimizer_step": (c_int, [c_void_p, c_void_p]),
        "moe_optimizer_set_lr": (c_int, [c_void_p, c_double]),
        "moe_optimizer_get_config": (c_int, [c_void_p, P(OptimizerConfig), P(c_int64)]),
        "moe_optimizer_destroy": (c_int, [c_void_p]),
    }
    for name, (res, args) in protos.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _check_abi(lib):
    lc = lib.moe_layer_config_default()
    oc = lib.moe_optimizer_config_default(0)
    for cls, st in ((LayerConfig, lc), (OptimizerConfig, oc)):
        if st.struct_size != ctypes.sizeof(cls):
            raise OSError(f"libmoe ABI mismatch: the library's {cls.__name__} is "
                          f"{st.struct_size} bytes, this binding's {ctypes.sizeof(cls)}")


_lib = None
_lib_path = None


def lib():
    """The loaded library (loaded on first use)."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    tried = []
    for path in _candidates():
        if not os.path.exists(path):
            tried.append(path + " (absent)")
            continue
        try:
            handle = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        _declare(handle)
        _check_abi(handle)
        _lib, _lib_path = handle, path
        return _lib
    raise OSError("libmoe shared library not found; build it (cmake -S . -B build && "
                  "cmake --build build) or set LIBMOE_PATH to libmoe.so. Tried:\n  " +
                  "\n  ".join(tried))


def lib_path():
    lib()
    return _lib_path
