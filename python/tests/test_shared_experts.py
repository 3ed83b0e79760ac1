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
