"""test_hierarchical.py - hierarchical gating through the binding: the router weights' shapes, a
numpy transcription of the forward (docs/semantics.md, "Hierarchical gating", softmax over the
selected at each level), the per-level losses in stats, and a bad config."""
import numpy as np
import pytest

import libmoe
from libmoe import MoeError


def test_hierarchical_layer_matches_numpy():
    ctx = libmoe.Context("cpu")
    D, F, E, G, k1, k2 = 8, 16, 12, 3, 2, 2
    L = libmoe.Layer(ctx, d_model=D, d_ff=F, num_experts=E, top_k=k1 * k2, activation="relu",
                     router="hierarchical", num_groups=G, topk_group=k1, switch_loss_coef=0.1)
    wp, ws = L.param("router_weight"), L.param("secondary_router_weight")
    assert wp.shape == (D, G) and ws.shape == (G, D, E // G)
    rng = np.random.default_rng(3)
    wp[...] = rng.uniform(-2, 2, wp.shape)
    ws[...] = rng.uniform(-2, 2, ws.shape)
    x = rng.standard_normal((20, D)).astype(np.float32)
    y = L.forward(x)
    p = {k: v[0].astype(np.float64) for k, v in L.params().items()}
    xd = x.astype(np.float64)
    want = np.zeros_like(xd)
    Eg = E // G
    for t in range(x.shape[0]):
        l1 = xd[t] @ p["router_weight"]
        grp = np.argsort(-l1, kind="stable")[:k1]
        g1 = np.exp(l1[grp] - l1[grp].max())
        g1 /= g1.sum()
        for j1, g in enumerate(grp):
            l2 = xd[t] @ p["secondary_router_weight"][g]
            sel = np.argsort(-l2, kind="stable")[:k2]
            g2 = np.exp(l2[sel] - l2[sel].max())
            g2 /= g2.sum()
            for j2, e in enumerate(sel):
                ge = g * Eg + e
                h = np.maximum(xd[t] @ p["w1"][ge] + p["b1"][ge], 0.0)
                want[t] += g1[j1] * g2[j2] * (h @ p["w2"][ge] + p["b2"][ge])
    assert np.max(np.abs(y - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))
    st = L.stats()
    assert len(st["level_switch_loss"]) == 2
    assert st["switch_loss"] == pytest.approx(sum(st["level_switch_loss"]))
    L.backward(np.ones_like(y))
    assert np.any(L.grad("secondary_router_weight") != 0)


def test_hierarchical_bad_groups():
    ctx = libmoe.Context("cpu")
    with pytest.raises(MoeError, match="num_groups"):
        libmoe.Layer(ctx, d_model=8, d_ff=8, num_experts=8, top_k=2, router="hierarchical",
                     num_groups=3, topk_group=1)
