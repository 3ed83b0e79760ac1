"""test_binding.py - the ctypes binding against the C library: shapes, a numpy transcription of
docs/semantics.md, a finite-difference gradient, the optimizer, and bad input."""
import math

import numpy as np
import pytest

import libmoe
from libmoe import MoeError


@pytest.fixture
def ctx():
    return libmoe.Context("cpu")


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- a float64 numpy transcription of docs/semantics.md (no noise) ------------------------------

def act(name, v):
    if name == "relu":
        return np.maximum(v, 0.0)
    if name == "silu":
        return v / (1.0 + np.exp(-v))
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))
    raise ValueError(name)


def reference_forward(layer, x, activation, gate, capacity_factor=0.0, renormalize=1):
    p = {k: v[0].astype(np.float64) for k, v in layer.params().items()}
    x = x.astype(np.float64)
    T, E, K = x.shape[0], layer.num_experts, layer.top_k
    logits = x @ p["router_weight"]
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :K]  # ties: lower expert first
    sel = np.take_along_axis(logits, idx, axis=1)
    if gate == "softmax_of_topk":
        g = np.exp(sel - sel.max(axis=1, keepdims=True))
        g /= g.sum(axis=1, keepdims=True)
    else:
        pr = np.exp(logits - logits.max(axis=1, keepdims=True))
        pr /= pr.sum(axis=1, keepdims=True)
        g = np.take_along_axis(pr, idx, axis=1)
        if renormalize:
            g /= g.sum(axis=1, keepdims=True)
    kept = np.ones((T, K), dtype=bool)
    if capacity_factor > 0:  # position priority: all first choices in token order, then 2nd...
        C = math.ceil(capacity_factor * T * K / E)
        used = np.zeros(E, dtype=int)
        for j in range(K):
            for t in range(T):
                e = idx[t, j]
                kept[t, j] = used[e] < C
                used[e] += 1
    y = np.zeros_like(x)
    for t in range(T):
        for j in range(K):
            if kept[t, j]:
                e = idx[t, j]
                hid = act(activation, x[t] @ p["w1"][e] + p["b1"][e])
                y[t] += g[t, j] * (hid @ p["w2"][e] + p["b2"][e])
    return y, idx, g, kept


# ---- tests ------------------------------------------------------------------------------------------

def test_forward_backward_shapes(ctx):
    layer = libmoe.Layer(ctx, d_model=12, d_ff=20, num_experts=6, top_k=2, activation="swiglu",
                         noisy_gating=1, capacity_factor=1.0)
    x = rand((33, 12))
    y = layer.forward(x, training=True)
    assert y.shape == (33, 12) and y.dtype == np.float32 and np.isfinite(y).all()
    dx = layer.backward(rand((33, 12), 1))
    assert dx.shape == (33, 12) and np.isfinite(dx).all()
    shapes = {k: (v.shape, g.shape) for k, (v, g) in layer.params().items()}
    assert shapes == {
        "router_weight": ((12, 6), (12, 6)), "noise_weight": ((12, 6), (12, 6)),
        "w1": ((6, 12, 40), (6, 12, 40)), "b1": ((6, 40), (6, 40)),
        "w2": ((6, 20, 12), (6, 20, 12)), "b2": ((6, 12), (6, 12))}
    st = layer.stats()
    assert st["num_tokens"] == 33 and st["num_assignments"] == 66
    assert st["tokens_per_expert"].sum() == 66
    assert st["dropped_per_expert"].sum() == st["num_dropped"]
    idx, gate, kept = layer.routing()
    assert idx.shape == gate.shape == kept.shape == (33, 2)
    assert kept.sum() == 66 - st["num_dropped"]
    # float64 input is converted; a list works too
    assert layer.forward(x.astype(np.float64).tolist(), training=False).shape == (33, 12)


@pytest.mark.parametrize("activation,gate,cf", [("relu", "softmax_of_topk", 0.0),
                                                ("silu", "topk_of_softmax", 0.0),
                                                ("gelu", "softmax_of_topk", 0.75)])
def test_matches_numpy_transcription(ctx, activation, gate, cf):
    layer = libmoe.Layer(ctx, d_model=8, d_ff=16, num_experts=4, top_k=2, activation=activation,
                         gate=gate, capacity_factor=cf, seed=7)
    x = rand((40, 8), 3)
    y = layer.forward(x, training=False)
    want, idx, g, kept = reference_forward(layer, x, activation, gate, cf)
    # f32 storage and arithmetic against float64: outputs of order 0.1-1
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    got_idx, got_g, got_kept = layer.routing()
    np.testing.assert_array_equal(got_idx, idx)
    np.testing.assert_allclose(got_g, g, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_kept, kept)
    counts = np.bincount(idx.ravel(), minlength=4)
    np.testing.assert_array_equal(layer.stats()["tokens_per_expert"], counts)
    # dW2 of expert e = sum over its kept assignments of g * act(x W1 + b1)^T dy
    dy = rand((40, 8), 4)
    layer.backward(dy)
    p = {k: v[0].astype(np.float64) for k, v in layer.params().items()}
    dw2 = np.zeros_like(p["w2"])
    for t in range(40):
        for j in range(2):
            if kept[t, j]:
                e = idx[t, j]
                hid = act(activation, x[t].astype(np.float64) @ p["w1"][e] + p["b1"][e])
                dw2[e] += g[t, j] * np.outer(hid, dy[t])
    np.testing.assert_allclose(layer.grad("w2"), dw2, rtol=1e-4, atol=1e-5)


def test_finite_difference_gradient(ctx):
    layer = libmoe.Layer(ctx, d_model=6, d_ff=8, num_experts=4, top_k=2, activation="gelu",
                         seed=3)
    x = rand((12, 6), 5)
    r = rand((12, 6), 6).astype(np.float64)
    layer.forward(x, training=False)
    idx0 = layer.routing()[0]
    layer.zero_grad()
    layer.backward(r.astype(np.float32))  # loss = sum(y * r), so dy = r

    def loss():
        return float((layer.forward(x, training=False).astype(np.float64) * r).sum())

    checked = 0
    for name, elems in (("w1", [(0, 0, 0), (1, 2, 3), (3, 5, 7)]), ("w2", [(2, 4, 1)]),
                        ("b1", [(1, 5)]), ("router_weight", [(0, 1), (4, 3), (2, 2)])):
        w, g = layer.param(name), layer.grad(name)
        for e in elems:
            h = 1e-2
            old = float(w[e])
            w[e] = old + h
            lp = loss()
            same = np.array_equal(layer.routing()[0], idx0)
            w[e] = old - h
            lm = loss()
            same = same and np.array_equal(layer.routing()[0], idx0)
            w[e] = old
            if not same:  # the perturbation changed a top-k choice: no derivative there
                continue
            fd = (lp - lm) / (2 * h)
            # central difference of an f32 forward: O(h^2) curvature plus f32 rounding of the
            # loss (~1e-6) over 2h
            assert abs(fd - g[e]) <= 2e-3 + 2e-2 * abs(fd), (name, e, fd, g[e])
            checked += 1
    assert checked >= 6


def test_param_views_write_through(ctx):
    layer = libmoe.Layer(ctx, d_model=4, d_ff=4, num_experts=2, top_k=1, expert_bias=1)
    x = rand((5, 4))
    b2 = layer.param("b2")
    y0 = layer.forward(x, training=False)
    b2 += 1.0  # every token's expert output shifts by gate * 1
    y1 = layer.forward(x, training=False)
    _, gate, _ = layer.routing()
    np.testing.assert_allclose(y1 - y0, np.repeat(gate, 4, axis=1), rtol=1e-5, atol=1e-6)
    assert layer.param("noise_weight") is None
    # a view keeps the layer alive
    w = libmoe.Layer(ctx, d_model=4, d_ff=4, num_experts=2, top_k=1).param("w1")
    assert np.isfinite(w).all()


def test_optimizer_matches_formula(ctx):
    layer = libmoe.Layer(ctx, d_model=4, d_ff=8, num_experts=2, top_k=2)
    opt = libmoe.Optimizer(layer, "adamw", lr=0.1, weight_decay=0.1)
    for v, g in layer.params().values():
        v[...] = 1.0
        g[...] = 0.5
    opt.step()
    for v, g in layer.params().values():  # p (1 - lr wd) - lr (constant gradient)
        np.testing.assert_allclose(v, 0.89, atol=1e-6)
        np.testing.assert_array_equal(g, 0.5)  # the step does not zero the gradient
    layer.zero_grad()
    assert all((g == 0).all() for _, g in layer.params().values())
    assert opt.num_steps == 1
    opt.lr = 0.05
    assert opt.lr == 0.05 and opt.config["weight_decay"] == pytest.approx(0.1)
    sgd = libmoe.Optimizer(layer, "sgd", lr=0.5, momentum=0.0)
    w = layer.param("w2").copy()
    layer.grad("w2")[...] = 0.25
    sgd.step()
    np.testing.assert_allclose(layer.param("w2"), w - 0.125, atol=1e-6)


def test_bad_input_raises_moe_error(ctx):
    with pytest.raises(MoeError) as e:
        libmoe.Layer(ctx, d_model=8, d_ff=8, num_experts=4, top_k=5)
    assert e.value.status == libmoe.INVALID_ARGUMENT and "top_k" in e.value.message
    with pytest.raises(MoeError):
        libmoe.Layer(ctx, no_such_field=1)
    with pytest.raises(MoeError):
        libmoe.Layer(ctx, activation="tanh")
    layer = libmoe.Layer(ctx, d_model=8, d_ff=8, num_experts=4, top_k=2)
    with pytest.raises(MoeError) as e:
        layer.backward(np.zeros((3, 8), np.float32))
    assert e.value.status == libmoe.INVALID_ARGUMENT and "forward" in e.value.message
    with pytest.raises(MoeError):
        layer.forward(np.zeros((3, 7), np.float32))
    x = rand((3, 8))
    x[1, 2] = np.nan
    with pytest.raises(MoeError) as e:
        layer.forward(x)
    assert e.value.status == libmoe.NUMERIC_ERROR
    layer.forward(rand((3, 8)))  # still usable
    with pytest.raises(MoeError):
        layer.backward(np.zeros((4, 8), np.float32))  # not the last forward's tokens
    for kw in ({"lr": -1.0}, {"beta1": 1.0}, {"eps": 0.0}, {"bogus": 1}):
        with pytest.raises(MoeError) as e:
            libmoe.Optimizer(layer, "adam", **kw)
    with pytest.raises(MoeError):
        libmoe.Optimizer(layer, "lion")
    opt = libmoe.Optimizer(layer, "adam")
    with pytest.raises(MoeError):
        opt.set_lr(float("nan"))
    layer.forward(rand((3, 8)))
    layer.backward(rand((3, 8)))
    layer.grad("w1")[0, 0, 0] = np.inf
    w = layer.param("w1").copy()
    with pytest.raises(MoeError) as e:
        opt.step()
    assert e.value.status == libmoe.NUMERIC_ERROR
    np.testing.assert_array_equal(layer.param("w1"), w)
    with pytest.raises(MoeError):
        libmoe.Context("tpu")


def test_integers_that_do_not_fit_c_raise():
    # ctypes wraps an int that does not fit its C type: 2**64 + 8 would make a layer of width 8
    cases = [({"d_model": 2**64 + 8}, "d_model"), ({"d_ff": 2**63}, "d_ff"),
             ({"num_experts": -2**63 - 1}, "num_experts"), ({"top_k": 2**64 + 2}, "top_k"),
             ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
             ({"noisy_gating": 2**32 + 1}, "noisy_gating"), ({"activation": 2**32 + 1},
                                                              "activation"),
             ({"num_chunks": 2**64 + 1}, "num_chunks"), ({"d_model": 8.5}, "d_model"),
             ({"capacity_factor": 10**400}, "capacity_factor")]
    ctx = libmoe.Context("cpu")
    for kw, name in cases:
        with pytest.raises(MoeError) as e:
            libmoe.Layer(ctx, **dict(dict(d_model=8, d_ff=8, num_experts=4, top_k=2), **kw))
        assert e.value.status == libmoe.INVALID_ARGUMENT and name in e.value.message, kw
        assert "range" in e.value.message or "must be" in e.value.message
    # the edges of the ranges still work
    layer = libmoe.Layer(ctx, d_model=8, d_ff=8, num_experts=4, top_k=2, seed=2**64 - 1)
    assert layer.config["seed"] == 2**64 - 1
    assert libmoe.Layer(ctx, d_model=np.int64(8), d_ff=8, num_experts=4, top_k=2).d_model == 8
    with pytest.raises(MoeError) as e:
        libmoe.Context("cpu", device=2**32)
    assert "device" in e.value.message
    with pytest.raises(MoeError) as e:
        layer.forward(0, y=0, num_tokens=2**64 + 3)
    assert "num_tokens" in e.value.message
    with pytest.raises(MoeError) as e:
        layer.forward(2**64, y=0, num_tokens=0)
    assert "pointer" in e.value.message
    with pytest.raises(MoeError) as e:
        libmoe.Optimizer(layer, "sgd", nesterov=2**32 + 1)
    assert "nesterov" in e.value.message
    with pytest.raises(MoeError) as e:
        libmoe.Optimizer(layer, 2**32)
    assert "optimizer kind" in e.value.message


# ---- the CUDA backend against the CPU backend (skips without a GPU) ---------------------------

class _CudaMemory:
    """cudaMalloc / cudaMemcpy through the CUDA runtime libmoe.so already loaded (found by its
    soname), so the device path runs without torch or cupy."""

    H2D, D2H = 1, 2

    def __init__(self):
        import ctypes
        self.rt = None
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                self.rt = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.rt is None:
            pytest.fail("a CUDA context exists but no CUDA runtime library could be loaded")
        self.ctypes = ctypes
        self.live = []

    def _ok(self, rc, what):
        assert rc == 0, f"{what} failed with cudaError {rc}"

    def alloc(self, nbytes):
        p = self.ctypes.c_void_p()
        self._ok(self.rt.cudaMalloc(self.ctypes.byref(p), self.ctypes.c_size_t(nbytes)),
                 "cudaMalloc")
        self.live.append(p.value)
        return p.value

    def upload(self, dst, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        self._ok(self.rt.cudaMemcpy(self.ctypes.c_void_p(dst), self.ctypes.c_void_p(a.ctypes.data),
                                    self.ctypes.c_size_t(a.nbytes), self.H2D), "cudaMemcpy")

    def download(self, src, shape):
        a = np.empty(shape, dtype=np.float32)
        self._ok(self.rt.cudaMemcpy(self.ctypes.c_void_p(a.ctypes.data), self.ctypes.c_void_p(src),
                                    self.ctypes.c_size_t(a.nbytes), self.D2H), "cudaMemcpy")
        return a

    def free(self):
        for p in self.live:
            self.rt.cudaFree(self.ctypes.c_void_p(p))
        self.live = []


def test_cuda_forward_backward_match_cpu():
    try:
        gpu = libmoe.Context("cuda")
    except MoeError as e:  # a build without CUDA, or no device: nothing of this can run here
        assert e.status == libmoe.NOT_SUPPORTED, e
        pytest.skip(f"no CUDA backend or no GPU: {e.message}")
    cpu = libmoe.Context("cpu")
    cfg = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, activation="gelu", seed=11)
    ref = libmoe.Layer(cpu, **cfg)
    dev = libmoe.Layer(gpu, **cfg)
    with pytest.raises(MoeError):
        dev.param("w1")  # numpy views are CPU-only; param_ptr gives device pointers
    mem = _CudaMemory()
    try:
        for name, (v, _) in ref.params().items():  # the same weights on both backends
            ptr, _, n = dev.param_ptr(name)
            assert n == v.size
            mem.upload(ptr, v)
        T = 48
        x, dy = rand((T, 16), 21), rand((T, 16), 22)
        y_ref = ref.forward(x, training=True)
        dx_ref = ref.backward(dy)
        xd, yd, dyd, dxd = (mem.alloc(T * 16 * 4) for _ in range(4))
        mem.upload(xd, x)
        mem.upload(dyd, dy)
        dev.forward(xd, y=yd, num_tokens=T, training=True)
        dev.backward(dyd, dx=dxd)
        # f32 on both backends, different summation orders (cuBLAS vs OpenBLAS): outputs ~0.1-1
        np.testing.assert_allclose(mem.download(yd, (T, 16)), y_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mem.download(dxd, (T, 16)), dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(dev.routing()[0], ref.routing()[0])
        for name, (_, g) in ref.params().items():
            _, gptr, n = dev.param_ptr(name)
            np.testing.assert_allclose(mem.download(gptr, g.shape), g, rtol=1e-4, atol=1e-5,
                                       err_msg=name)
    finally:
        mem.free()


# ---- load balancing: expert choice and the loss-free bias --------------------------------------

def test_expert_choice_routing_is_num_experts_wide(ctx):
    # routing arrays are (T, moe_layer_routing_width) = (T, E) for expert choice; a (T, top_k)
    # buffer would be overrun by the library
    T, E, k = 300, 8, 1
    layer = libmoe.Layer(ctx, d_model=8, d_ff=16, num_experts=E, top_k=k,
                         router="expert_choice", capacity_factor=1.0)
    layer.forward(rand((T, 8), 5))
    idx, gate, kept = layer.routing()
    assert idx.shape == gate.shape == kept.shape == (T, E)
    C = math.ceil(1.0 * T * k / E)
    picked = np.bincount(idx[kept], minlength=E)
    assert np.all(picked == C)  # every expert fills exactly its C slots
    st = layer.stats()
    assert np.all(st["tokens_per_expert"] - st["dropped_per_expert"] == C)


def test_score_bias_moves_only_with_the_update_rate(ctx):
    x = rand((256, 8), 6)
    plain = libmoe.Layer(ctx, d_model=8, d_ff=16, num_experts=4, top_k=1)
    plain.forward(x)
    assert np.all(plain.score_bias() == 0.0)
    lf = libmoe.Layer(ctx, d_model=8, d_ff=16, num_experts=4, top_k=1, bias_update_rate=0.01)
    lf.forward(x)
    counts = lf.stats()["tokens_per_expert"]
    expect = np.where(counts < counts.mean(), 0.01, np.where(counts > counts.mean(), -0.01, 0.0))
    np.testing.assert_allclose(lf.score_bias(), expect, atol=1e-7)


def test_output_checks_can_be_turned_off(ctx):
    # a NaN written into a weight: finite x, non-finite y
    layer = libmoe.Layer(ctx, d_model=8, d_ff=8, num_experts=4, top_k=2)
    layer.param("w2")[...] = np.nan
    x = rand((3, 8))
    with pytest.raises(MoeError) as e:
        layer.forward(x)
    assert e.value.status == libmoe.NUMERIC_ERROR and "y holds" in e.value.message
    layer.set_check_numerics(False)
    y = layer.forward(x)
    assert np.isnan(y).any()
    layer.set_check_numerics(True)
    with pytest.raises(MoeError):
        layer.forward(x)
