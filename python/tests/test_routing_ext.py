"""test_routing_ext.py - presets, expert masks and the DeepSeek-V3 routing through the binding:
the selection (sigmoid scores + bias, group-limited top-k) and gates transcribed in numpy from
docs/semantics.md "Routing extensions"."""
import numpy as np
import pytest

import libmoe
from libmoe import MoeError
from libmoe.api import PRESETS


@pytest.fixture
def ctx():
    return libmoe.Context("cpu")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_runs(ctx, name):
    layer = libmoe.Layer(ctx, preset=name, d_model=8, d_ff=4)
    assert layer.config["d_model"] == 8
    x = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float32)
    y = layer.forward(x)
    assert y.shape == (7, 8) and np.isfinite(y).all()


def test_unknown_preset_lists_the_names():
    with pytest.raises(MoeError) as e:
        libmoe.layer_config("nope")
    assert "deepseek-v3" in str(e.value)


def test_deepseek_v3_routing_matches_numpy(ctx):
    layer = libmoe.Layer(ctx, preset="deepseek-v3", d_model=8, d_ff=4)
    E, K, G, M = 256, 8, 8, 4
    rng = np.random.default_rng(3)
    wg, _ = layer.params()["router_weight"]
    wg[...] = rng.uniform(-1, 1, wg.shape).astype(np.float32)
    mask = np.ones(E, bool)
    mask[[5, 77, 200]] = False
    layer.set_expert_mask(mask)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    layer.forward(x, training=False)
    idx, gate, _ = layer.routing()
    logits = x.astype(np.float64) @ wg.astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-logits))
    sel = np.where(mask, s, -np.inf)  # the bias is 0 before any training step
    for t in range(16):
        grp = sel[t].reshape(G, E // G)
        top2 = -np.sort(-grp, axis=1)[:, :2].sum(axis=1)
        keep = np.argsort(-top2, kind="stable")[:M]
        cand = np.full(E, -np.inf)
        for g in keep:
            cand[g * 32:(g + 1) * 32] = sel[t, g * 32:(g + 1) * 32]
        want = np.argsort(-cand, kind="stable")[:K]
        np.testing.assert_array_equal(idx[t], want)
        w = s[t, want] / s[t, want].sum() * 2.5
        np.testing.assert_allclose(gate[t], w, rtol=1e-5, atol=1e-6)
    assert not layer.expert_availability()[[5, 77, 200]].any()
    assert (layer.expert_mask() == mask).all()
    with pytest.raises(MoeError):
        layer.set_expert_mask(np.zeros(E, bool))
