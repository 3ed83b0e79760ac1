#!/usr/bin/env python3
"""train_mixture.py - the training loop of examples/train_mixture.c, from Python through the
ctypes binding (python/libmoe), with numpy for the data and the readout.

R regimes: a token of regime r has input x = mu_r + n (n ~ N(0, I)) and target
y = V_r tanh(U_r (x - mu_r) + c_r). Model: one libmoe layer, then a linear readout in numpy,
pred = MoE(x) Wh + bh, MSE loss; the library's optimizer steps the layer, the same Adam written
here in numpy steps the readout. A dense baseline with the same active parameters per token
(E = 1, K = 1, width K*F) is trained on the same data; at the end both held-out losses and the
regime x expert routing table are printed. --check exits 1 unless the MoE's held-out MSE is below
--threshold and below the dense one.

    python3 examples/train_mixture.py [--steps N] [--seed S] [--backend cpu|cuda] [--check]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import libmoe  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps for each model")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backend", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless MoE held-out MSE < threshold and < dense")
    p.add_argument("--threshold", type=float, default=0.08)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--regimes", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--d-model", type=int, default=16)
    p.add_argument("--d-ff", type=int, default=32)
    p.add_argument("--d-out", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of Adam")
    p.add_argument("--no-noise", action="store_true", help="plain top-k gating")
    p.add_argument("--capacity-factor", type=float, default=0.0)
    p.add_argument("--switch-coef", type=float, default=1e-2)
    p.add_argument("--z-coef", type=float, default=1e-3)
    a = p.parse_args(argv)
    if a.log_every <= 0:
        a.log_every = max(1, a.steps // 10)
    return a


class Problem:
    """R clusters of inputs, each with its own random tanh teacher (width 16)."""

    def __init__(self, a, rng, width=16):
        R, D, O, H = a.regimes, a.d_model, a.d_out, width
        mu = rng.standard_normal((R, D))
        self.mu = 4.0 * mu / np.linalg.norm(mu, axis=1, keepdims=True)
        self.U = rng.standard_normal((R, H, D)) * 1.5 / np.sqrt(D)
        self.c = rng.standard_normal((R, H))
        self.V = rng.standard_normal((R, O, H)) / np.sqrt(H)
        self.R, self.D, self.O = R, D, O

    def sample(self, rng, T):
        r = rng.integers(0, self.R, size=T)
        n = rng.standard_normal((T, self.D))
        x = self.mu[r] + n
        hid = np.tanh(np.einsum("thd,td->th", self.U[r], n) + self.c[r])
        y = np.einsum("toh,th->to", self.V[r], hid)
        return x.astype(np.float32), y.astype(np.float32), r


class Staging:
    """Where the layer's x, y, dy live: numpy on the CPU backend; torch CUDA tensors (passed as
    device pointers) on the CUDA backend."""

    def __init__(self, backend):
        self.cuda = backend == "cuda"
        if self.cuda:
            import torch  # only the CUDA path needs a framework that can allocate device memory
            self.torch = torch

    def forward(self, layer, x, training):
        if not self.cuda:
            return layer.forward(x, training=training)
        t = self.torch
        self.x = t.from_numpy(x).cuda()
        self.y = t.empty_like(self.x)
        layer.forward(self.x.data_ptr(), y=self.y.data_ptr(), num_tokens=x.shape[0],
                      training=training, stream=t.cuda.current_stream().cuda_stream)
        return self.y.cpu().numpy()

    def backward(self, layer, dy):
        if not self.cuda:
            return layer.backward(dy)
        t = self.torch
        dyd = t.from_numpy(dy).cuda()
        dxd = t.empty_like(dyd)
        layer.backward(dyd.data_ptr(), dx=dxd.data_ptr(),
                       stream=t.cuda.current_stream().cuda_stream)
        return None


class Model:
    """A libmoe layer and a numpy readout, with the same kind of optimizer on both."""

    def __init__(self, name, ctx, a, E, K, F, head_rng):
        self.name, self.E, self.K, self.a = name, E, K, a
        self.layer = libmoe.Layer(
            ctx, d_model=a.d_model, d_ff=F, num_experts=E, top_k=K, activation="gelu",
            # Switch-style top-k of the softmax, not renormalised: with K = 1 the gate weight
            # still carries a gradient into the router
            gate="topk_of_softmax", renormalize=0,
            noisy_gating=int(E > 1 and not a.no_noise), capacity_factor=a.capacity_factor,
            switch_loss_coef=a.switch_coef if E > 1 else 0.0,
            z_loss_coef=a.z_coef if E > 1 else 0.0, seed=a.seed * 7919 + 17)
        self.opt = libmoe.Optimizer(self.layer, "sgd" if a.sgd else "adam", lr=a.lr)
        self.Wh = (head_rng.standard_normal((a.d_model, a.d_out)) / np.sqrt(a.d_model))
        self.bh = np.zeros(a.d_out)
        self.m = [np.zeros_like(self.Wh), np.zeros_like(self.bh)]
        self.v = [np.zeros_like(self.Wh), np.zeros_like(self.bh)]
        self.t = 0

    def forward(self, stage, x, y, training):
        self.h = stage.forward(self.layer, x, training).astype(np.float64)
        self.pred = self.h @ self.Wh + self.bh
        return float(np.mean((self.pred - y) ** 2))

    def backward_step(self, stage, y):
        dpred = 2.0 * (self.pred - y) / self.pred.size  # d mean((pred - y)^2) / d pred
        grads = [self.h.T @ dpred, dpred.sum(axis=0)]
        dh = (dpred @ self.Wh.T).astype(np.float32)
        self.layer.zero_grad()
        stage.backward(self.layer, dh)
        self.opt.step()
        self.t += 1
        a = self.a
        for p, g, m, v in zip([self.Wh, self.bh], grads, self.m, self.v):
            if a.sgd:
                m[...] = g if self.t == 1 else 0.9 * m + g
                p -= a.lr * m
            else:
                m[...] = 0.9 * m + 0.1 * g
                v[...] = 0.999 * v + 0.001 * g * g
                p -= (a.lr / (1 - 0.9 ** self.t)) * m / (
                    np.sqrt(v) / np.sqrt(1 - 0.999 ** self.t) + 1e-8)


def train(model, problem, a, stage, ev):
    rng = np.random.default_rng(a.seed * 1000003 + 5)  # the same batches for every model
    print(f"\n== {model.name}: E={model.E} K={model.K} ==")
    run, nrun, t0 = 0.0, 0, time.perf_counter()
    for s in range(1, a.steps + 1):
        x, y, _ = problem.sample(rng, a.batch)
        run += model.forward(stage, x, y, True)
        nrun += 1
        model.backward_step(stage, y)
        if s % a.log_every == 0 or s == a.steps:
            st = model.layer.stats()
            tpe = " ".join(f"{n:4d}" for n in st["tokens_per_expert"])
            print(f"step {s:5d}  loss {run / nrun:.5f}  tokens/expert {tpe}  dropped "
                  f"{st['num_dropped']}  switch {st['switch_loss']:.3f}  z {st['z_loss']:.3f}  "
                  f"aux {st['aux_loss']:.5f}", flush=True)
            run, nrun = 0.0, 0
    secs = time.perf_counter() - t0
    loss = model.forward(stage, ev[0], ev[1], False)
    print(f"{model.name}: held-out MSE {loss:.5f} after {a.steps} steps ({secs:.1f} s)")
    return loss


def specialisation(model, regime, R):
    """Regime x expert table of the last (held-out) forward; returns the mean over regimes of
    the largest fraction (1.0: every regime goes to one expert)."""
    idx, _, kept = model.layer.routing()
    K, E = model.K, model.E
    frac = np.zeros((R, E))
    for j in range(K):
        np.add.at(frac, (regime[kept[:, j]], idx[kept[:, j], j]), 1.0 / K)
    frac /= np.maximum(np.bincount(regime, minlength=R), 1)[:, None]
    print(f"\nfraction of each regime's held-out tokens routed to each expert (K={K} choices "
          f"count 1/K each):")
    print("  regime " + "".join(f"  exp{e:<3d} " for e in range(E)))
    for r in range(R):
        print(f"  {r:6d} " + "".join(f"  {f:5.3f} " for f in frac[r]))
    purity = float(frac.max(axis=1).mean())
    print(f"  specialisation (mean over regimes of the largest fraction): {purity:.3f}")
    return purity, frac


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    problem = Problem(a, np.random.default_rng(a.seed))
    ev = problem.sample(np.random.default_rng(a.seed * 31337 + 3), 4096)
    var = float(np.mean((ev[1] - ev[1].mean(axis=0)) ** 2))
    noise = "plain top-k" if a.no_noise else "noisy top-k"
    print(f"train_mixture.py: {a.regimes} regimes, D={a.d_model}, targets {a.d_out}-dim from "
          f"per-regime tanh teachers (width 16); libmoe at {libmoe.lib_path()}")
    print(f"  MoE E={a.experts} K={a.top_k} F={a.d_ff} ({noise}) vs dense F={a.top_k * a.d_ff} "
          f"(same active parameters per token), {'SGD momentum 0.9' if a.sgd else 'Adam'}, "
          f"lr {a.lr:g}, {a.steps} steps x {a.batch} tokens, seed {a.seed}, backend {a.backend}")
    print(f"  held-out MSE of predicting the mean: {var:.5f}")
    try:
        ctx = libmoe.Context(a.backend)
        stage = Staging(a.backend)
        moe = Model("moe", ctx, a, a.experts, a.top_k, a.d_ff,
                    np.random.default_rng(a.seed * 4099 + 11))
        dense = Model("dense", ctx, a, 1, 1, a.top_k * a.d_ff,
                      np.random.default_rng(a.seed * 4099 + 11))
        moe_loss = train(moe, problem, a, stage, ev)
        purity, _ = specialisation(moe, ev[2], a.regimes)
        dense_loss = train(dense, problem, a, stage, ev)
    except libmoe.MoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nfinal held-out MSE: moe {moe_loss:.5f}  dense {dense_loss:.5f}  (mean predictor "
          f"{var:.5f}); moe/dense {moe_loss / dense_loss:.3f}; specialisation {purity:.3f}")
    if a.check:
        ok = moe_loss < a.threshold and moe_loss < dense_loss
        print(f"check: moe {moe_loss:.5f} < threshold {a.threshold:.5f} and < dense "
              f"{dense_loss:.5f}: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
