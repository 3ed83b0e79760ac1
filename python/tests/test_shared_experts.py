"""Shared experts through the binding: the config fields, the SHARED_* parameter views and y
against a numpy transcription of docs/semantics.md (routed part taken from the same layer with
the shared output removed)."""
import numpy as np
import pytest

import libmoe


def silu(v):
    return v / (1.0 + np.exp(-v))


@pytest.mark.parametrize("gated", [0, 1])
def test_shared_expert_output_matches_numpy(gated):
    ctx = libmoe.Context("cpu")
    D, F, Fs, S = 8, 6, 10, 2
    layer = libmoe.Layer(ctx, d_model=D, d_ff=F, num_experts=4, top_k=2, activation="swiglu",
                         expert_bias=0, num_shared_experts=S, shared_d_ff=Fs,
                         shared_expert_gate=gated, seed=5)
    assert layer.config["num_shared_experts"] == S and layer.config["shared_d_ff"] == Fs
    w1, w2 = layer.param("shared_w1"), layer.param("shared_w2")
    assert w1.shape == (S, D, 2 * Fs) and w2.shape == (S, Fs, D)
    assert layer.param("shared_b1") is None
    wg = layer.param("shared_gate")
    assert (wg is not None) == bool(gated)
    if gated:
        assert wg.shape == (D, 1)
    x = np.random.default_rng(1).uniform(-1, 1, (13, D)).astype(np.float32)
    y = layer.forward(x)
    # the routed part alone: zero the shared down projection (the shared output is then 0)
    saved = w2.copy()
    w2[...] = 0
    y_routed = layer.forward(x)
    w2[...] = saved
    xd = x.astype(np.float64)
    out = np.zeros_like(xd)
    for s in range(S):
        h = xd @ w1[s].astype(np.float64)
        out += (silu(h[:, :Fs]) * h[:, Fs:]) @ w2[s].astype(np.float64)
    g = 1.0 / (1.0 + np.exp(-(xd @ wg.astype(np.float64)))) if gated else 1.0
    np.testing.assert_allclose(y - y_routed, g * out, rtol=1e-4, atol=1e-5)
    assert np.abs(g * out).max() > 0.05
    layer.backward(np.ones_like(x))
    assert np.abs(layer.grad("shared_w1")).max() > 0


def test_shared_field_validation_names_the_field():
    ctx = libmoe.Context("cpu")
    with pytest.raises(libmoe.MoeError, match="shared_expert_gate"):
        libmoe.Layer(ctx, d_model=8, d_ff=8, num_experts=4, top_k=2, shared_expert_gate=1)


def test_per_expert_outputs_match_the_fused_path():
    """forward_experts / backward_experts: sum_j gate y_experts is forward's y, and the backward
    from (g dy, <dy, y_experts>) is backward(dy)."""
    ctx = libmoe.Context("cpu")
    kw = dict(d_model=8, d_ff=12, num_experts=4, top_k=2, capacity_factor=0.6, seed=9,
              switch_loss_coef=0.1)
    a, b = libmoe.Layer(ctx, **kw), libmoe.Layer(ctx, **kw)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (21, 8)).astype(np.float32)
    dy = rng.uniform(-1, 1, (21, 8)).astype(np.float32)
    y = a.forward(x)
    ye, g = b.forward_experts(x)
    assert ye.shape == (21, 2, 8) and g.shape == (21, 2)
    _, _, kept = b.routing()
    assert not kept.all() and (g[~kept] == 0).all() and (ye[~kept] == 0).all()
    np.testing.assert_allclose((g[:, :, None] * ye).sum(1), y, rtol=1e-5, atol=1e-6)
    dxa = a.backward(dy)
    dxb = b.backward_experts(g[:, :, None] * dy[:, None, :], (ye * dy[:, None, :]).sum(2))
    np.testing.assert_allclose(dxb, dxa, rtol=1e-4, atol=1e-6)
    for name in ("router_weight", "w1", "w2"):
        np.testing.assert_allclose(b.grad(name), a.grad(name), rtol=1e-4, atol=1e-6)


def test_torch_module_exposes_the_shared_parameters():
    torch = pytest.importorskip("torch")
    import libmoe.torch as lt
    kw = dict(num_shared_experts=2, shared_d_ff=6, shared_expert_gate=1, activation="swiglu",
              seed=3)
    m = lt.MoE(8, 12, 4, 2, **kw)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["shared_w1"] == (2, 8, 12) and shapes["shared_w2"] == (2, 6, 8)
    assert shapes["shared_gate"] == (8, 1)
    ref = libmoe.Layer(libmoe.Context("cpu"), d_model=8, d_ff=12, num_experts=4, top_k=2, **kw)
    x = np.random.default_rng(4).uniform(-1, 1, (5, 8)).astype(np.float32)
    dy = np.random.default_rng(5).uniform(-1, 1, (5, 8)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    y = m(xt)
    (y * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), ref.forward(x), rtol=1e-6, atol=1e-7)
    dx = ref.backward(dy)
    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-6, atol=1e-7)
    for name in ("shared_w1", "shared_b2", "shared_gate"):
        g = getattr(m, name).grad.numpy()
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(g, ref.grad(name), rtol=1e-6, atol=1e-7)
