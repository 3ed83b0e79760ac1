"""test_hf_compare.py - libmoe's presets against HF transformers' MoE blocks (optional: skipped
where transformers is not installed). The same weights in both; outputs and the
load-balancing loss compared, with the conventions of docs/presets.md: HF's loss is K times
libmoe's Switch loss, and HF's Switch block passes a dropped token through as p * x where
libmoe adds nothing. Run with transformers 4.46.3 beside Debian's torch 1.13 (a venv made with
--system-site-packages); Qwen3-MoE and DeepSeek-V3 blocks need a newer transformers."""
import numpy as np
import pytest

import libmoe

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

D, F = 16, 8


@pytest.fixture
def ctx():
    return libmoe.Context("cpu")


def _swiglu_into(layer, experts, names):
    """libmoe W1 = [gate^T | up^T], W2 = down^T from HF expert modules (gate, up, down names)"""
    w1, _ = layer.params()["w1"]
    w2, _ = layer.params()["w2"]
    g, u, d = names
    for e, ex in enumerate(experts):
        w1[e, :, :F] = getattr(ex, g).weight.detach().numpy().T
        w1[e, :, F:] = getattr(ex, u).weight.detach().numpy().T
        w2[e] = getattr(ex, d).weight.detach().numpy().T


def _router_into(layer, weight):
    wg, _ = layer.params()["router_weight"]
    wg[...] = weight.detach().numpy().T


def _x(T, seed=0):
    return np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def _hf_lb_loss(logits, E, K):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    return float(load_balancing_loss_func((logits,), E, K))


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "olmoe"])
def test_topk_families_match_hf(ctx, family):
    torch.manual_seed(0)
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F)
        block, names = MixtralSparseMoeBlock(cfg), ("w1", "w3", "w2")
    elif family == "qwen2-moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F,
                             shared_expert_intermediate_size=F, num_experts=60,
                             num_experts_per_tok=4, norm_topk_prob=False)
        block, names = Qwen2MoeSparseMoeBlock(cfg), ("gate_proj", "up_proj", "down_proj")
        with torch.no_grad():  # the routed part only: the shared expert's output is 0
            block.shared_expert.down_proj.weight.zero_()
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
        cfg = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=64,
                          num_experts_per_tok=8, norm_topk_prob=False)
        block, names = OlmoeSparseMoeBlock(cfg), ("gate_proj", "up_proj", "down_proj")
    block.eval()
    layer = libmoe.Layer(ctx, preset=family, d_model=D, d_ff=F)
    E, K = layer.num_experts, layer.top_k
    with torch.no_grad():
        block.gate.weight.mul_(8.0)  # a router with spread logits (no near-ties)
    _router_into(layer, block.gate.weight)
    _swiglu_into(layer, block.experts, names)
    T = 40
    x = _x(T)
    with torch.no_grad():
        y_hf, logits = block(torch.from_numpy(x).view(1, T, D))
    y = layer.forward(x, training=True)
    assert _rel(y, y_hf.view(T, D).numpy()) < 1e-5
    st = layer.stats()
    hf = _hf_lb_loss(logits, E, K)
    assert abs(K * st["switch_loss"] - hf) < 1e-5 * max(1.0, hf)
    # the preset's coefficient is K times the released model's router_aux_loss_coef (Mixtral's
    # config.json says 0.02; MixtralConfig's class default is 0.001)
    released = {"mixtral": 0.02, "qwen2-moe": 0.001, "olmoe": 0.01}[family]
    assert abs(layer.config["switch_loss_coef"] - K * released) < 1e-12


def test_switch_matches_hf_with_dropped_tokens_passed_through(ctx):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP, load_balancing_loss_func, router_z_loss_func)
    torch.manual_seed(1)
    E, T, C = 8, 32, 3  # capacity 3 of 32 tokens over 8 experts: drops
    cfg = SwitchTransformersConfig(d_model=D, d_ff=F, num_experts=E, expert_capacity=C,
                                   router_jitter_noise=0.0, dropout_rate=0.0)
    block = SwitchTransformersSparseMLP(cfg).eval()
    layer = libmoe.Layer(ctx, preset="switch", d_model=D, d_ff=F,
                         capacity_factor=C * E / T)  # ceil(cf T K / E) = C
    with torch.no_grad():
        block.router.classifier.weight.mul_(8.0)
    _router_into(layer, block.router.classifier.weight)
    w1, _ = layer.params()["w1"]
    w2, _ = layer.params()["w2"]
    for e in range(E):
        ex = block.experts[f"expert_{e}"]
        w1[e] = ex.wi.weight.detach().numpy().T
        w2[e] = ex.wo.weight.detach().numpy().T
    x = _x(T, 2)
    with torch.no_grad():
        y_hf, (logits, expert_index) = block(torch.from_numpy(x).view(1, T, D))
    y = layer.forward(x, training=True)
    idx, gate, kept = layer.routing()
    assert (~kept).sum() > 0, "the case should drop tokens"
    # HF: a dropped token leaves as p * x; libmoe adds nothing for it
    y_pass = y + (~kept[:, :1]) * gate[:, :1] * x
    assert _rel(y_pass, y_hf.view(T, D).numpy()) < 1e-5
    # HF's expert_index is the argmax of the capacity-masked one-hot: the expert for kept
    # tokens, 0 for dropped ones
    hf_idx = expert_index.view(T).numpy()
    np.testing.assert_array_equal(hf_idx[kept[:, 0]], idx[kept[:, 0], 0])
    assert (hf_idx[~kept[:, 0]] == 0).all()
    st = layer.stats()
    probs = torch.softmax(logits, dim=-1)
    # libmoe's f counts choices before dropping: HF's loss function given the router's own
    # choice (argmax of the logits) equals it; given the block's expert_index it counts the
    # dropped tokens at expert 0 and differs
    choice = torch.from_numpy(idx[:, 0].astype(np.int64)).view(1, T)
    hf_lb = float(load_balancing_loss_func(probs, choice))
    assert abs(st["switch_loss"] - hf_lb) < 1e-5 * max(1.0, hf_lb)
    hf_lb_block = float(load_balancing_loss_func(probs, expert_index))
    assert abs(st["switch_loss"] - hf_lb_block) > 1e-3
    assert abs(st["z_loss"] - float(router_z_loss_func(logits))) < 1e-5
