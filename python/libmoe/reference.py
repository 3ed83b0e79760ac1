"""reference.py - TorchMoE: the layer of docs/semantics.md in plain torch ops, with the same
parameter names and shapes as libmoe.torch.MoE, so that state dicts load both ways and torch's
autograd of this block checks the C layer's gradients.

Covers token choice without gating noise: both gate orders (with renormalise), relu, gelu
(exact), silu and swiglu, expert biases on or off, dropless or a capacity with position
priority, and the Switch and z aux losses. Anything else raises ValueError. The aux loss of the
last forward is self.aux_loss (a tensor): add it to the loss that is differentiated, since here,
unlike in the C layer, its gradient comes from autograd.
"""
import math

import torch
import torch.nn.functional as F

_SUPPORTED = {"activation": ("relu", "gelu", "silu", "swiglu"),
              "gate": ("softmax_of_topk", "topk_of_softmax"), "priority": ("position",),
              "router": ("token_choice",)}
_ZERO = ("noisy_gating", "importance_loss_coef", "load_loss_coef", "bias_update_rate")


class TorchMoE(torch.nn.Module):
    """TorchMoE(d_model, d_ff, num_experts, top_k, **config) with the config keywords of
    libmoe.torch.MoE (the subset above). Parameters start at zero: load a state dict, or build
    one from a libmoe module with TorchMoE.like(moe)."""

    def __init__(self, d_model, d_ff, num_experts, top_k=2, *, device=None, dtype=None,
                 activation="gelu", gate="softmax_of_topk", renormalize=1, capacity_factor=0.0,
                 priority="position", expert_bias=1, switch_loss_coef=0.0, z_loss_coef=0.0,
                 router="token_choice", **rest):
        super().__init__()
        for key, value in (("activation", activation), ("gate", gate), ("priority", priority),
                           ("router", router)):
            if value not in _SUPPORTED[key]:
                raise ValueError(f"TorchMoE: {key}={value!r} is not one of {_SUPPORTED[key]}")
        for key in _ZERO:
            if rest.pop(key, 0):
                raise ValueError(f"TorchMoE: {key} is not modelled here (it must be 0)")
        rest.pop("seed", None)  # initialisation comes from a state dict
        rest.pop("num_chunks", None)  # results do not depend on it
        rest.pop("dtype", None)
        if rest:
            raise ValueError(f"TorchMoE: unknown config {sorted(rest)}")
        D, Fh, E = d_model, d_ff, num_experts
        F2 = 2 * Fh if activation == "swiglu" else Fh
        kw = {"device": device, "dtype": dtype or torch.float32}
        # registered in moe.h's order, as libmoe.torch.MoE does
        self.router_weight = torch.nn.Parameter(torch.zeros(D, E, **kw))
        self.w1 = torch.nn.Parameter(torch.zeros(E, D, F2, **kw))
        self.b1 = torch.nn.Parameter(torch.zeros(E, F2, **kw)) if expert_bias else None
        self.w2 = torch.nn.Parameter(torch.zeros(E, Fh, D, **kw))
        self.b2 = torch.nn.Parameter(torch.zeros(E, D, **kw)) if expert_bias else None
        self.d_model, self.d_ff, self.num_experts, self.top_k = D, Fh, E, top_k
        self.activation, self.gate, self.renormalize = activation, gate, renormalize
        self.capacity_factor = capacity_factor
        self.switch_loss_coef, self.z_loss_coef = switch_loss_coef, z_loss_coef
        self.aux_loss = None

    @classmethod
    def like(cls, moe, device=None):
        """A TorchMoE with the config and the current weights of a libmoe.torch.MoE."""
        c = dict(moe._config)
        ref = cls(c.pop("d_model"), c.pop("d_ff"), c.pop("num_experts"), c.pop("top_k"),
                  device=device or moe._device, **c)
        ref.load_state_dict({k: v.detach().float() for k, v in moe.state_dict().items()})
        return ref

    def _act(self, h):
        if self.activation == "swiglu":
            g, u = h[:, :self.d_ff], h[:, self.d_ff:]  # W1 columns are [gate | up]
            return F.silu(g) * u
        return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[self.activation](h)

    def _kept(self, idx):
        """(T, K) bool: which assignments fit the capacity (position priority)."""
        T, K, E = idx.shape[0], self.top_k, self.num_experts
        if self.capacity_factor <= 0:
            return torch.ones_like(idx, dtype=torch.bool)
        C = math.ceil(self.capacity_factor * T * K / E)
        order = idx.t().reshape(-1)  # all first choices in token order, then all second, ...
        onehot = F.one_hot(order, E)
        slot = (onehot.cumsum(0) - 1).gather(1, order[:, None]).squeeze(1)
        return (slot < C).view(K, T).t()

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.d_model)
        T, E, K = x2.shape[0], self.num_experts, self.top_k
        logits = x2 @ self.router_weight
        top, idx = torch.topk(logits, K, dim=-1)  # random inputs: no ties to order
        if self.gate == "softmax_of_topk":
            g = torch.softmax(top, dim=-1)
        else:
            g = torch.softmax(logits, dim=-1).gather(1, idx)
            if self.renormalize:
                g = g / g.sum(dim=-1, keepdim=True)
        kept = self._kept(idx)
        y = torch.zeros_like(x2)
        for e in range(E):
            tok, j = ((idx == e) & kept).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x2[tok] @ self.w1[e]
            if self.b1 is not None:
                h = h + self.b1[e]
            out = self._act(h) @ self.w2[e]
            if self.b2 is not None:
                out = out + self.b2[e]
            y = y.index_add(0, tok, out * g[tok, j].unsqueeze(1))
        aux = logits.new_zeros(())
        if self.switch_loss_coef:
            f = torch.bincount(idx.reshape(-1), minlength=E).to(logits.dtype) / (T * K)
            P = torch.softmax(logits, dim=-1).mean(0)
            aux = aux + self.switch_loss_coef * E * (f * P).sum()
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = aux
        return y.reshape(shape)
