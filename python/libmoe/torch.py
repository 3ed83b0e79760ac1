"""torch.py - libmoe as a PyTorch module: MoE(nn.Module), whose parameters alias the layer's own
memory and whose forward and backward are one torch.autograd.Function calling the C layer.

    import torch, libmoe.torch
    moe = libmoe.torch.MoE(d_model=64, d_ff=256, num_experts=8, top_k=2, activation="gelu")
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    y = moe(x)                  # x (..., d_model); y like x
    y.square().mean().backward()
    opt.step(); opt.zero_grad()

Memory: every parameter (router_weight, noise_weight, w1, b1, w2, b2, as in moe.h) is a torch
tensor over the layer's buffer (numpy's array interface on the CPU, the CUDA array interface on
a GPU), and its .grad, once set, is a tensor over the layer's gradient buffer: no copies per
step. The C backward accumulates into that buffer; when .grad is None (after
zero_grad(set_to_none=True), torch 2's default) the buffer is zeroed first, so .grad accumulates
over backward passes exactly as torch's own parameters do.

Streams: on CUDA the layer runs on torch's current stream of the layer's device (forward and
backward alike; autograd's backward stream is the forward's).

Not supported (each raises or is said here): calling one module twice before backward (the C
layer keeps the state of its last forward only: the older call's backward raises); gradients
through torch.autograd.grad() (the layer writes .grad, it returns none) and double backward;
DistributedDataParallel's gradient hooks (they hook AccumulateGrad, which the layer bypasses);
autocast (the layer computes in its own dtype: float32 on CPU; float32, bfloat16 or float16 on
CUDA); pickling the module (save its state_dict instead); float64.
"""
import contextlib
import copy
import weakref

import numpy as np
import torch

from . import api
from ._lib import DTYPES, PARAMS
from .api import INVALID_ARGUMENT, NOT_SUPPORTED, Context, Layer, MoeError

__all__ = ["MoE", "MoeError"]

_TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
# CUDA array interface type strings: bfloat16 has none, so its buffers are viewed as int16 first
_TYPESTR = {"f32": "<f4", "f16": "<f2", "bf16": "<i2"}

# one library context per device, shared by every layer on it (a CUDA context owns a cuBLAS
# handle and streams: one per layer would be wasteful with many layers)
_contexts = {}


def _device_key(device):
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.device("cuda", index)
    raise MoeError(NOT_SUPPORTED, f"libmoe runs on cpu and cuda devices, not {device}")


def _context(device):
    ctx = _contexts.get(device)
    if ctx is None:
        ctx = Context(device.type, device.index or 0)
        _contexts[device] = ctx
    return ctx


def _dtype_name(dtype):
    if isinstance(dtype, str):
        api._arg(dtype in DTYPES, f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise MoeError(NOT_SUPPORTED, f"libmoe layers hold float32, bfloat16 or float16, "
                                      f"not {dtype}")
    return _DTYPE_NAMES[dtype]


class _CudaArray:
    """The CUDA array interface over device memory of a layer; keeps the layer alive as long as
    a tensor made from it lives."""

    def __init__(self, owner, ptr, shape, typestr):
        self._owner = owner
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                         "data": (ptr, False), "strides": None, "version": 2}


def _alias(layer, ptr, shape, dtype_name, device):
    """A torch tensor over ptr (memory the layer owns), holding a reference to the layer."""
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(api._View(layer, ptr, shape, "<f4")))
    t = torch.as_tensor(_CudaArray(layer, ptr, shape, _TYPESTR[dtype_name]), device=device)
    return t.view(torch.bfloat16) if dtype_name == "bf16" else t


def _stream(device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


class _MoEFunction(torch.autograd.Function):
    """y = layer(x); backward accumulates the layer's gradients and returns dx. The parameters
    are inputs only so that y requires grad when they do: their gradients reach .grad through
    the layer's own buffers, never through autograd."""

    @staticmethod
    def forward(ctx, x, module, *params):
        y = torch.empty_like(x)
        module._calls += 1
        ctx.module_ref = weakref.ref(module)
        ctx.call = module._calls
        with module._on_device():
            module._layer.forward(x, y=y, num_tokens=x.shape[0], training=module.training,
                                  stream=_stream(module._device))
        return y

    @staticmethod
    def backward(ctx, dy):
        module = ctx.module_ref()
        if module is None:
            raise RuntimeError("libmoe.torch.MoE: the module was deleted before backward")
        if ctx.call != module._calls:
            raise RuntimeError("libmoe.torch.MoE: backward of an older forward: the layer keeps "
                               "the state of its last forward only, so a module may be called "
                               "once per backward (use one MoE module per call site)")
        dy = dy.contiguous()
        dx = torch.empty_like(dy)
        with module._on_device():
            module._grads_before_backward()
            module._layer.backward(dy, dx=dx, stream=_stream(module._device))
            module._grads_after_backward()
        return (dx, None) + (None,) * (len(ctx.needs_input_grad) - 2)


class MoE(torch.nn.Module):
    """One libmoe layer as a torch module. MoE(d_model, d_ff, num_experts, top_k, device=...,
    dtype=..., **config) takes any field of moe_layer_config_t as a keyword (enums by name:
    activation='swiglu', gate='topk_of_softmax'). Input (..., d_model), output of the same
    shape and dtype. Parameters are initialised by the library from config['seed']."""

    def __init__(self, d_model, d_ff, num_experts, top_k=2, *, device=None, dtype=None,
                 **config):
        super().__init__()
        self._config = dict(config, d_model=d_model, d_ff=d_ff, num_experts=num_experts,
                            top_k=top_k)
        if dtype is not None:
            self._config["dtype"] = _dtype_name(dtype)
        self._calls = 0
        self._build(_device_key(device or "cpu"))

    # ---- the layer and its aliases ----
    def _build(self, device):
        """Creates the C layer on device and points every parameter (and set gradient) at its
        memory; on a rebuild (to(device), to(dtype)) the current values are copied over."""
        layer = Layer(_context(device), **self._config)
        dtype_name = next(k for k, v in DTYPES.items() if v == layer.config["dtype"])
        values, grads = {}, {}
        for name in PARAMS:
            v, g, n = layer.param_ptr(name)
            if n == 0:
                continue
            shape = layer._shape(name, n)
            values[name] = _alias(layer, v, shape, dtype_name, device)
            grads[name] = _alias(layer, g, shape, dtype_name, device)
        with torch.no_grad():
            for name, value in values.items():
                p = self._parameters.get(name)
                if p is None:
                    self.register_parameter(name, torch.nn.Parameter(value))
                    continue
                value.copy_(p.data)
                old_grad = p.grad
                p.grad = None
                p.data = value  # the same Parameter object: optimizers keep working
                if old_grad is not None:
                    grads[name].copy_(old_grad)
                    p.grad = grads[name]
        self._layer, self._device, self._dtype_name = layer, device, dtype_name
        self._grad_alias = grads

    def _on_device(self):
        if self._device.type == "cuda":
            return torch.cuda.device(self._device)
        return contextlib.nullcontext()

    def _grads_before_backward(self):
        # the C backward adds into its gradient buffer: make the buffer hold what .grad holds
        for name, p in self._parameters.items():
            g = self._grad_alias[name]
            if p.grad is None:
                g.zero_()
            elif p.grad.data_ptr() != g.data_ptr():  # a gradient the user assigned
                g.copy_(p.grad)

    def _grads_after_backward(self):
        for name, p in self._parameters.items():
            if p.requires_grad and (p.grad is None or
                                    p.grad.data_ptr() != self._grad_alias[name].data_ptr()):
                p.grad = self._grad_alias[name]

    def _apply(self, fn, *args, **kwargs):
        # to(), cuda(), cpu(), half(), ...: find where fn sends a tensor of the layer, and
        # rebuild the C layer there; the default _apply would move the parameters away from
        # the layer's memory
        probe = fn(torch.zeros(1, dtype=_TORCH_DTYPES[self._dtype_name], device=self._device))
        device = _device_key(probe.device)
        dtype_name = _dtype_name(probe.dtype)
        if device != self._device or dtype_name != self._dtype_name:
            self._config["dtype"] = dtype_name
            self._build(device)
        return self

    # ---- compute ----
    def forward(self, x):
        D = self._config["d_model"]
        if not isinstance(x, torch.Tensor):
            raise MoeError(INVALID_ARGUMENT, f"x must be a torch.Tensor, not {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != D:
            raise MoeError(INVALID_ARGUMENT, f"x has shape {tuple(x.shape)}, expected "
                                             f"(..., {D})")
        if _device_key(x.device) != self._device:
            raise MoeError(INVALID_ARGUMENT, f"x is on {x.device}, the layer on {self._device} "
                                             f"(move one with .to())")
        x2 = x.reshape(-1, D).to(_TORCH_DTYPES[self._dtype_name]).contiguous()
        y = _MoEFunction.apply(x2, self, *self._parameters.values())
        return y.reshape(x.shape).to(x.dtype)

    # ---- what the last forward did (for logging) ----
    def stats(self):
        """Routing statistics of the last forward (moe_routing_stats_t as a dict, plus
        tokens_per_expert and dropped_per_expert); on CUDA this waits for the layer."""
        with self._on_device():
            return self._layer.stats()

    @property
    def aux_loss(self):
        """The last forward's aux loss (sum of coef * loss) as a float. Its gradient is already
        part of backward: do not add it to the loss that is differentiated."""
        return self.stats()["aux_loss"]

    def routing(self):
        """(expert index, gate weight, kept) of the last forward's tokens, numpy (T, width)."""
        with self._on_device():
            return self._layer.routing()

    @property
    def config(self):
        """The layer's validated moe_layer_config_t as a dict."""
        return dict(self._layer.config)

    def extra_repr(self):
        c = self._config
        extra = {k: v for k, v in c.items()
                 if k not in ("d_model", "d_ff", "num_experts", "top_k")}
        return (f"d_model={c['d_model']}, d_ff={c['d_ff']}, num_experts={c['num_experts']}, "
                f"top_k={c['top_k']}, device={self._device}, dtype={self._dtype_name}" +
                "".join(f", {k}={v}" for k, v in extra.items() if k != "dtype"))

    # ---- copies ----
    def __deepcopy__(self, memo):
        new = MoE(**copy.deepcopy(self._config, memo), device=self._device)
        new.train(self.training)
        with torch.no_grad():
            for name, p in self._parameters.items():
                q = new._parameters[name]
                q.copy_(p)
                q.requires_grad_(p.requires_grad)
                if p.grad is not None:
                    new._grad_alias[name].copy_(p.grad)
                    q.grad = new._grad_alias[name]
        memo[id(self)] = new
        return new

    def __getstate__(self):
        raise TypeError("libmoe.torch.MoE cannot be pickled (its parameters live in the C "
                        "layer): save and load its state_dict() instead")

