"""api.py - Context, Layer, Optimizer and MoeError over the C API (numpy in, numpy out).

CPU backend: arrays are numpy float32, and the parameters and gradients are numpy views of the
library's own memory (writes go straight into the layer). Other backends: pass device pointers
as ints (or objects with __cuda_array_interface__, e.g. a torch or cupy tensor) and a stream as
an int; the *_ptr methods return device pointers.
"""
import ctypes
import operator
from ctypes import byref, c_float, c_int, c_int32, c_int64, c_size_t, c_uint64, c_void_p

import numpy as np

from . import _lib
from ._lib import (ACTIVATIONS, BACKENDS, DTYPES, GATES, GROUP_SCORES, OPTIMIZERS, PARAMS,
                   PRIORITIES, ROUTERS, SCORE_FUNCS, STATUS_NAMES, LayerConfig, OptimizerConfig,
                   RoutingStats)

SUCCESS = 0
INVALID_ARGUMENT = 1
NOT_SUPPORTED = 2
ALLOC_FAILED = 3
NUMERIC_ERROR = 4


class MoeError(Exception):
    """A libmoe call failed: .status (int), .status_name, .message (moe_last_error())."""

    def __init__(self, status, message, call=None):
        self.status = int(status)
        self.status_name = STATUS_NAMES.get(self.status, "MOE_STATUS_UNKNOWN")
        self.message = message
        self.call = call
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{self.status_name}: {message}")


def _check(status, call):
    if status != SUCCESS:
        raise MoeError(status, _lib.lib().moe_last_error().decode("utf-8", "replace"), call)


def _arg(cond, message):
    """A bad argument caught before the C call: the same exception as the library's."""
    if not cond:
        raise MoeError(INVALID_ARGUMENT, message)


# the range of every C integer type the API takes: ctypes itself wraps an int that does not fit
# silently (2**64 + 8 becomes 8), so every integer is checked before it reaches C
_INT_RANGES = {c_int: (-2**31, 2**31 - 1), c_int64: (-2**63, 2**63 - 1),
               c_uint64: (0, 2**64 - 1), c_size_t: (0, 2**64 - 1), c_void_p: (0, 2**64 - 1)}
_INT_NAMES = {c_int: "int", c_int64: "int64_t", c_uint64: "uint64_t", c_size_t: "size_t",
              c_void_p: "a pointer"}


def _c_int(value, ctype, what):
    """value as a Python int that fits ctype, or MoeError naming the argument and the range."""
    _arg(not isinstance(value, float) and hasattr(value, "__index__"),
         f"{what} must be an integer, not {type(value).__name__} ({value!r})")
    v = operator.index(value)
    lo, hi = _INT_RANGES[ctype]
    _arg(lo <= v <= hi, f"{what} = {v} does not fit {_INT_NAMES[ctype]} "
                        f"(range {lo} .. {hi})")
    return v


def _enum(table, value, what):
    if isinstance(value, str):
        _arg(value.lower() in table, f"{what} '{value}' is not one of {sorted(table)}")
        return table[value.lower()]
    return _c_int(value, c_int, what)


def _set_fields(st, fields, what, **values):
    """Sets fields of a ctypes struct, each integer range-checked against its C type."""
    types = dict(fields)
    for k, v in values.items():
        t = types[k]
        if t in _INT_RANGES:
            v = _c_int(v, t, f"{what}.{k}")
        else:
            try:
                v = float(v)
            except (TypeError, ValueError, OverflowError):
                raise MoeError(INVALID_ARGUMENT, f"{what}.{k} must be a number that fits a "
                                                 f"double, not {v!r}") from None
        setattr(st, k, v)


def _ptr(obj):
    """A device pointer from an int or an object with __cuda_array_interface__ (None -> 0)."""
    if obj is None:
        return None
    if isinstance(obj, int):
        return _c_int(obj, c_void_p, "pointer")
    if hasattr(obj, "data_ptr"):  # torch first: its bfloat16 tensors have no array interface
        return int(obj.data_ptr())
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return int(cai["data"][0])
    raise MoeError(INVALID_ARGUMENT, f"expected a device pointer (int) or a CUDA array, "
                                     f"not {type(obj).__name__}")


def version():
    a, b, c = c_int(), c_int(), c_int()
    _lib.lib().moe_get_version(byref(a), byref(b), byref(c))
    return a.value, b.value, c.value


class _View:
    """Exposes library memory to numpy and keeps its owner alive as long as the array lives."""

    def __init__(self, owner, ptr, shape, typestr):
        self._owner = owner
        self.__array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                    "data": (ptr, False), "version": 3}


class _Handle:
    """A library handle owned by a Python object: close() destroys it once (also on garbage
    collection and at the end of a with-block). Subclasses set _h and name their destroy call."""

    _destroy = None  # name of the moe_*_destroy function

    def close(self):
        if getattr(self, "_h", None):
            _check(getattr(self._lib, self._destroy)(self._h), self._destroy)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Context(_Handle):
    """One backend on one device: Context('cpu') or Context('cuda', device=0)."""

    _destroy = "moe_context_destroy"

    def __init__(self, backend="cpu", device=0):
        self._lib = _lib.lib()
        self.backend = _enum(BACKENDS, backend, "backend")
        self._h = c_void_p()
        self.device = _c_int(device, c_int, "device")
        _check(self._lib.moe_context_create(byref(self._h), self.backend, self.device, None),
               "moe_context_create")

    @property
    def is_cpu(self):
        return self.backend == BACKENDS["cpu"]


_CONFIG_ENUMS = {"activation": (ACTIVATIONS,), "dtype": (DTYPES,),
                 "gate": (GATES,), "priority": (PRIORITIES,), "router": (ROUTERS,),
                 "score_func": (SCORE_FUNCS,), "group_score": (GROUP_SCORES,)}

PRESETS = ("mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "switch", "olmoe")


def layer_config(preset=None, **kw):
    """moe_layer_config_default(), or moe_layer_config_preset(preset) when a preset name is
    given (one of PRESETS, docs/presets.md), with the given fields changed (enums as names or
    ints)."""
    cfg = _lib.lib().moe_layer_config_default()
    if preset is not None:
        _arg(isinstance(preset, str), f"preset must be a name, not {type(preset).__name__}")
        _check(_lib.lib().moe_layer_config_preset(preset.encode(), byref(cfg)),
               "moe_layer_config_preset")
    names = {f[0] for f in LayerConfig._fields_} - {"struct_size"}
    for k, v in kw.items():
        _arg(k in names, f"'{k}' is not a field of moe_layer_config_t ({sorted(names)})")
        if k in _CONFIG_ENUMS:
            v = _enum(_CONFIG_ENUMS[k][0], v, k)
        _set_fields(cfg, LayerConfig._fields_, "moe_layer_config_t", **{k: v})
    return cfg


def _config_dict(cfg):
    return {f[0]: getattr(cfg, f[0]) for f in cfg._fields_ if f[0] != "struct_size"}


class Layer(_Handle):
    """One MoE layer on a context: Layer(ctx, d_model=64, d_ff=128, num_experts=8, top_k=2, ...)
    takes any field of moe_layer_config_t as a keyword (enums by name: activation='gelu').
    close() destroys the layer: parameter views taken from it must not be used afterwards; let
    the layer be garbage collected instead to keep them safe."""

    _destroy = "moe_layer_destroy"

    def __init__(self, ctx, preset=None, **config):
        _arg(isinstance(ctx, Context) and ctx._h, "ctx must be a live Context")
        self._lib = _lib.lib()
        self.ctx = ctx
        cfg = layer_config(preset, **config)
        self._h = c_void_p()
        _check(self._lib.moe_layer_create(byref(self._h), ctx._h, byref(cfg)),
               "moe_layer_create")
        got = LayerConfig()
        _check(self._lib.moe_layer_get_config(self._h, byref(got)), "moe_layer_get_config")
        self.config = _config_dict(got)
        self.d_model = got.d_model
        self.num_experts = got.num_experts
        self.top_k = got.top_k
        f2 = 2 * got.d_ff if got.activation == ACTIVATIONS["swiglu"] else got.d_ff
        self._f2 = f2
        self._out = None  # y of the last forward on the CPU, reused for its dx

    def _live(self):
        _arg(self._h, "the layer was closed")
        return self._h

    # ---- compute ----
    def _host_tokens(self, a, name):
        _arg(self.ctx.is_cpu, f"{name}: numpy arrays are for the CPU backend; pass device "
                              f"pointers and num_tokens on other backends")
        a = np.ascontiguousarray(a, dtype=np.float32)
        _arg(a.ndim == 2 and a.shape[1] == self.d_model,
             f"{name} has shape {a.shape}, expected (num_tokens, {self.d_model})")
        return a

    def forward(self, x, training=True, stream=None, y=None, num_tokens=None):
        """CPU: y = forward(x) with x (T, D) array-like -> float32 (T, D). Device: forward(x_ptr,
        y=y_ptr, num_tokens=T, stream=...) with pointers; returns None."""
        h = self._live()
        if isinstance(x, np.ndarray) or not (isinstance(x, int) or hasattr(x, "data_ptr") or
                                            hasattr(x, "__cuda_array_interface__")):
            x = self._host_tokens(x, "x")
            out = np.empty_like(x) if y is None else y
            _arg(isinstance(out, np.ndarray) and out.shape == x.shape and
                 out.dtype == np.float32 and out.flags.c_contiguous,
                 "y must be a C-contiguous float32 array shaped like x")
            _check(self._lib.moe_layer_forward(h, x.ctypes.data, out.ctypes.data, x.shape[0],
                                               int(bool(training)), _ptr(stream)),
                   "moe_layer_forward")
            return out
        _arg(y is not None and num_tokens is not None,
             "device forward needs y (a pointer) and num_tokens")
        _check(self._lib.moe_layer_forward(h, _ptr(x), _ptr(y),
                                           _c_int(num_tokens, c_int64, "num_tokens"),
                                           int(bool(training)), _ptr(stream)),
               "moe_layer_forward")
        return None

    def backward(self, dy, stream=None, dx=None):
        """CPU: dx = backward(dy), dy (T, D) of the last forward; accumulates every parameter
        gradient. Device: backward(dy_ptr, dx=dx_ptr, stream=...)."""
        h = self._live()
        if isinstance(dy, int) or hasattr(dy, "data_ptr") or \
                hasattr(dy, "__cuda_array_interface__"):
            _arg(dx is not None, "device backward needs dx (a pointer)")
            _check(self._lib.moe_layer_backward(h, _ptr(dy), _ptr(dx), _ptr(stream)),
                   "moe_layer_backward")
            return None
        dy = self._host_tokens(dy, "dy")
        st = RoutingStats()
        if self._lib.moe_layer_stats(h, byref(st), None, None) == SUCCESS:
            _arg(dy.shape[0] == st.num_tokens, f"dy has {dy.shape[0]} tokens, the last forward "
                                               f"had {st.num_tokens}")
        out = np.empty_like(dy) if dx is None else dx
        _arg(isinstance(out, np.ndarray) and out.shape == dy.shape and out.dtype == np.float32
             and out.flags.c_contiguous, "dx must be a C-contiguous float32 array like dy")
        _check(self._lib.moe_layer_backward(h, dy.ctypes.data, out.ctypes.data, _ptr(stream)),
               "moe_layer_backward")
        return out

    def forward_experts(self, x, training=True, stream=None, y_experts=None, gate=None,
                        num_tokens=None):
        """Per-expert outputs (moe_layer_forward_experts). CPU: (y_experts float32 (T, W, D),
        gate float32 (T, W)) = forward_experts(x), W = moe_layer_routing_width; a dropped
        assignment gives a zero row and gate 0. Device: pointers y_experts, gate and num_tokens;
        returns None."""
        h = self._live()
        W = self._lib.moe_layer_routing_width(h)
        if isinstance(x, int) or hasattr(x, "data_ptr") or \
                hasattr(x, "__cuda_array_interface__"):
            _arg(y_experts is not None and gate is not None and num_tokens is not None,
                 "device forward_experts needs y_experts, gate (pointers) and num_tokens")
            _check(self._lib.moe_layer_forward_experts(
                h, _ptr(x), _ptr(y_experts), _ptr(gate),
                _c_int(num_tokens, c_int64, "num_tokens"), int(bool(training)), _ptr(stream)),
                "moe_layer_forward_experts")
            return None
        x = self._host_tokens(x, "x")
        T = x.shape[0]
        ye = np.empty((T, W, self.d_model), dtype=np.float32)
        ge = np.empty((T, W), dtype=np.float32)
        _check(self._lib.moe_layer_forward_experts(h, x.ctypes.data, ye.ctypes.data,
                                                   ge.ctypes.data, T, int(bool(training)),
                                                   _ptr(stream)),
               "moe_layer_forward_experts")
        return ye, ge

    def backward_experts(self, dy_experts, dgate, stream=None, dx=None):
        """CPU: dx = backward_experts(dy_experts (T, W, D), dgate (T, W)) of the last forward;
        accumulates every parameter gradient. Device: pointers and dx=dx_ptr."""
        h = self._live()
        if isinstance(dy_experts, int) or hasattr(dy_experts, "data_ptr") or \
                hasattr(dy_experts, "__cuda_array_interface__"):
            _arg(dx is not None, "device backward_experts needs dx (a pointer)")
            _check(self._lib.moe_layer_backward_experts(h, _ptr(dy_experts), _ptr(dgate),
                                                        _ptr(dx), _ptr(stream)),
                   "moe_layer_backward_experts")
            return None
        _arg(self.ctx.is_cpu, "numpy arrays are for the CPU backend; pass device pointers")
        W = self._lib.moe_layer_routing_width(h)
        T = self.stats()["num_tokens"]
        dye = np.ascontiguousarray(dy_experts, dtype=np.float32)
        dg = np.ascontiguousarray(dgate, dtype=np.float32)
        _arg(dye.shape == (T, W, self.d_model),
             f"dy_experts has shape {dye.shape}, expected {(T, W, self.d_model)}")
        _arg(dg.shape == (T, W), f"dgate has shape {dg.shape}, expected {(T, W)}")
        out = np.empty((T, self.d_model), dtype=np.float32)
        _check(self._lib.moe_layer_backward_experts(h, dye.ctypes.data, dg.ctypes.data,
                                                    out.ctypes.data, _ptr(stream)),
               "moe_layer_backward_experts")
        return out

    def zero_grad(self, stream=None):
        _check(self._lib.moe_layer_zero_grad(self._live(), _ptr(stream)), "moe_layer_zero_grad")

    def set_check_numerics(self, enable=True):
        """Turns the checks of y, dx and the gradients for NaN/Inf on (the default) or off
        (moe_layer_set_check_numerics: each check is a pass over the output, a host wait on
        CUDA). The checks of x and dy stay on."""
        _check(self._lib.moe_layer_set_check_numerics(self._live(), 1 if enable else 0),
               "moe_layer_set_check_numerics")

    # ---- parameters ----
    def _shape(self, which, numel):
        D, E, F2, F = self.d_model, self.num_experts, self._f2, self.config["d_ff"]
        G = self.config.get("num_groups", 0)
        if self.config.get("router") == ROUTERS["hierarchical"]:  # (D, G) and (G, D, E / G)
            if which == "router_weight":
                return (D, G)
            if which == "secondary_router_weight":
                return (G, D, E // G)
        per = {"router_weight": (D, E), "noise_weight": (D, E), "shared_gate": (D, 1)}
        if which in per:
            return per[which]
        if which.startswith("shared_"):  # (S, ...): the shared experts' own width Fs
            F = self.config["shared_d_ff"] or F
            F2 = 2 * F if self.config["activation"] == ACTIVATIONS["swiglu"] else F
        tail = {"w1": (D, F2), "b1": (F2,), "w2": (F, D),
                "b2": (D,)}[which[len("shared_"):] if which.startswith("shared_") else which]
        return (numel // int(np.prod(tail)),) + tail

    def param_ptr(self, which):
        """(value pointer, grad pointer, numel) of a parameter, as ints (0, 0, 0 when off)."""
        _arg(which in PARAMS, f"parameter '{which}' is not one of {sorted(PARAMS)}")
        v, g, n = c_void_p(), c_void_p(), c_int64()
        _check(self._lib.moe_layer_param(self._live(), PARAMS[which], byref(v), byref(g),
                                         byref(n)), "moe_layer_param")
        return v.value or 0, g.value or 0, n.value

    def _view(self, which, grad):
        _arg(self.ctx.is_cpu, "numpy views exist on the CPU backend only: use param_ptr()")
        v, g, n = self.param_ptr(which)
        if n == 0:
            return None
        return np.asarray(_View(self, g if grad else v, self._shape(which, n), "<f4"))

    def param(self, which):
        """Numpy view (CPU) of a parameter's values, shaped as in moe.h; None when turned off.
        Writing into it changes the layer."""
        return self._view(which, False)

    def grad(self, which):
        """Numpy view (CPU) of a parameter's gradient; None when turned off."""
        return self._view(which, True)

    def params(self):
        """{name: (value view, grad view)} for every parameter the config turns on (CPU)."""
        out = {}
        for name in PARAMS:
            v = self.param(name)
            if v is not None:
                out[name] = (v, self.grad(name))
        return out

    # ---- what the last forward did ----
    def stats(self):
        """dict of moe_routing_stats_t plus tokens_per_expert and dropped_per_expert (int64)."""
        st = RoutingStats()
        tpe = np.zeros(self.num_experts, dtype=np.int64)
        dpe = np.zeros(self.num_experts, dtype=np.int64)
        _check(self._lib.moe_layer_stats(self._live(), byref(st),
                                         tpe.ctypes.data_as(ctypes.POINTER(c_int64)),
                                         dpe.ctypes.data_as(ctypes.POINTER(c_int64))),
               "moe_layer_stats")
        out = {f[0]: getattr(st, f[0]) for f in st._fields_}
        for k, v in out.items():
            if not isinstance(v, (int, float)):
                out[k] = list(v)  # the per-level arrays
        out["tokens_per_expert"] = tpe
        out["dropped_per_expert"] = dpe
        return out

    def routing(self):
        """(expert_index int32 (T, W), gate float32 (T, W), kept bool (T, W)) of this rank's
        tokens in the last forward, best choice first. W = moe_layer_routing_width: top_k for
        token choice, num_experts for expert choice (every (token, expert) pair)."""
        T = self.stats()["num_tokens"]
        K = self._lib.moe_layer_routing_width(self._live())
        idx = np.zeros((T, K), dtype=np.int32)
        gate = np.zeros((T, K), dtype=np.float32)
        kept = np.zeros((T, K), dtype=np.int32)
        _check(self._lib.moe_layer_routing(self._live(),
                                           idx.ctypes.data_as(ctypes.POINTER(c_int32)),
                                           gate.ctypes.data_as(ctypes.POINTER(c_float)),
                                           kept.ctypes.data_as(ctypes.POINTER(c_int32))),
               "moe_layer_routing")
        return idx, gate, kept.astype(bool)


    def score_bias(self):
        """The loss-free balancing selection bias, float32 (E,) (zeros unless
        bias_update_rate > 0)."""
        b = np.zeros(self.num_experts, dtype=np.float32)
        _check(self._lib.moe_layer_score_bias(self._live(),
                                              b.ctypes.data_as(ctypes.POINTER(c_float))),
               "moe_layer_score_bias")
        return b

    # ---- expert availability ----
    def set_expert_mask(self, mask):
        """Experts that may be selected: a bool / 0-1 array of num_experts entries, or None for
        all (moe_layer_set_expert_mask; collective with expert parallelism)."""
        if mask is None:
            _check(self._lib.moe_layer_set_expert_mask(self._live(), None),
                   "moe_layer_set_expert_mask")
            return
        m = np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
        _arg(m.shape == (self.num_experts,),
             f"mask must have {self.num_experts} entries, not shape {m.shape}")
        _check(self._lib.moe_layer_set_expert_mask(
            self._live(), m.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))),
            "moe_layer_set_expert_mask")

    def expert_mask(self):
        """The mask set by set_expert_mask, bool (E,)."""
        m = np.zeros(self.num_experts, dtype=np.uint8)
        _check(self._lib.moe_layer_expert_mask(
            self._live(), m.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))),
            "moe_layer_expert_mask")
        return m.astype(bool)

    def expert_availability(self):
        """Experts available in the last forward (mask and expert dropout), bool (E,)."""
        m = np.zeros(self.num_experts, dtype=np.uint8)
        _check(self._lib.moe_layer_expert_availability(
            self._live(), m.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), None),
            "moe_layer_expert_availability")
        return m.astype(bool)


class Optimizer(_Handle):
    """The library's optimizer over every parameter of a layer:
    Optimizer(layer, 'adam', lr=1e-3, ...) with any field of moe_optimizer_config_t."""

    _destroy = "moe_optimizer_destroy"

    def __init__(self, layer, kind="adam", **config):
        _arg(isinstance(layer, Layer) and layer._h, "layer must be a live Layer")
        self._lib = _lib.lib()
        self.layer = layer
        k = _enum(OPTIMIZERS, kind, "optimizer kind")
        cfg = self._lib.moe_optimizer_config_default(k)
        names = {f[0] for f in OptimizerConfig._fields_} - {"struct_size", "kind"}
        for key, v in config.items():
            _arg(key in names, f"'{key}' is not a field of moe_optimizer_config_t "
                               f"({sorted(names)})")
            _set_fields(cfg, OptimizerConfig._fields_, "moe_optimizer_config_t", **{key: v})
        self._h = c_void_p()
        _check(self._lib.moe_optimizer_create(byref(self._h), layer._h, byref(cfg)),
               "moe_optimizer_create")

    def step(self, stream=None):
        """Updates every parameter from its gradient (does not zero the gradients)."""
        _arg(self._h, "the optimizer was closed")
        _check(self._lib.moe_optimizer_step(self._h, _ptr(stream)), "moe_optimizer_step")

    def _config(self):
        cfg, n = OptimizerConfig(), c_int64()
        _check(self._lib.moe_optimizer_get_config(self._h, byref(cfg), byref(n)),
               "moe_optimizer_get_config")
        return cfg, n.value

    @property
    def config(self):
        return _config_dict(self._config()[0])

    @property
    def num_steps(self):
        return self._config()[1]

    @property
    def lr(self):
        return self._config()[0].lr

    @lr.setter
    def lr(self, value):
        self.set_lr(value)

    def set_lr(self, lr):
        _check(self._lib.moe_optimizer_set_lr(self._h, float(lr)), "moe_optimizer_set_lr")

