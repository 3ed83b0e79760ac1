#!/usr/bin/env python3
"""train_mixture.py - the training loop of examples/train_mixture.c, from Python through the
ctypes binding (python/libmoe), with numpy for the data and the readout.

R regimes: a token of regime r has input x = mu_r + n (n ~ N(0, I)) and target
y = V_r tanh(U_r (x - mu_r) + c_r). Model: one libmoe layer, then a linear readout in numpy,
pred = MoE(x) Wh + bh, MSE loss; the library's optimizer steps the layer, the same Adam written
here in numpy steps the readout. A dense baseline with the same active parameters per token
(E = 1, K = 1, width K*F) is trained on the same data; at the end both held-out losses and the
regime x expert routing table are printed. --check exits 1 unless the MoE's held-out MSE is below
--threshold and below the dense one. --strategy picks the load balancing and --csv FILE writes
the per-step balancing record, as in the C example (columns: docs/load-balancing.md).

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
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--strategy", choices=list(STRATEGIES)[1:], default="default",
                   help="load balancing (default: noisy top-k, switch 1e-2, z 1e-3)")
    p.add_argument("--capacity-factor", type=float, default=0.0)
    for name in ("switch", "importance", "load", "z"):
        p.add_argument(f"--{name}-coef", type=float, default=None,
                       help="aux loss coefficient (overrides the strategy's)")
    p.add_argument("--bias-rate", type=float, default=None, help="loss-free bias update rate")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--noise", dest="noisy", action="store_const", const=1)
    noise.add_argument("--no-noise", dest="noisy", action="store_const", const=0)
    p.add_argument("--csv", help="one row per logged step (docs/load-balancing.md)")
    a = p.parse_args(argv)
    if a.log_every <= 0:
        a.log_every = max(1, a.steps // 10)
    # the strategy's settings, then the explicit options on top (as train_mixture.c)
    st = STRATEGIES[a.strategy]
    for key in ("switch", "importance", "load", "z"):
        if getattr(a, key + "_coef") is None:
            setattr(a, key + "_coef", st.get(key, 0.0))
    if a.bias_rate is None:
        a.bias_rate = st.get("bias_rate", 0.0)
    if a.noisy is None:
        a.noisy = st.get("noisy", 0)
    a.router = st.get("router", "token_choice")
    return a


# load-balancing strategies: what each sets in the layer config
STRATEGIES = {
    "default": dict(switch=1e-2, z=1e-3, noisy=1),
    "none": {},
    "switch": dict(switch=1e-2),
    "importance-load": dict(importance=1e-1, load=1e-1, noisy=1),
    "z-loss": dict(z=1e-3),
    "loss-free": dict(bias_rate=1e-2),
    "expert-choice": dict(router="expert_choice"),
}


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
            noisy_gating=int(E > 1 and a.noisy), capacity_factor=a.capacity_factor if E > 1 else 0,
            switch_loss_coef=a.switch_coef if E > 1 else 0.0,
            importance_loss_coef=a.importance_coef if E > 1 else 0.0,
            load_loss_coef=a.load_coef if E > 1 else 0.0,
            z_loss_coef=a.z_coef if E > 1 else 0.0,
            bias_update_rate=a.bias_rate if E > 1 else 0.0,
            router=a.router if E > 1 else "token_choice", seed=a.seed * 7919 + 17)
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


def csv_header(E):
    e = range(E)
    return ",".join(["step", "loss", "tokens"] + [f"load_{i}" for i in e] +
                    [f"routed_{i}" for i in e] +
                    ["imbalance", "imbalance_routed", "dropped_frac", "unrouted_frac",
                     "switch_loss", "importance_loss", "load_loss", "z_loss", "aux_loss"] +
                    [f"bias_{i}" for i in e])


def log_step(model, a, s, loss, out):
    """The progress line and CSV row of the last training forward (columns as train_mixture.c:
    docs/load-balancing.md)."""
    st = model.layer.stats()
    load = st["tokens_per_expert"] - st["dropped_per_expert"]  # what the experts computed
    imbalance = float(load.max() / load.mean()) if load.sum() > 0 else 0.0
    _, _, kept = model.layer.routing()  # (T, W): W = K, or E for expert choice
    unrouted = float(np.mean(~kept.any(axis=1))) if kept.size else 0.0
    if a.router == "expert_choice":  # no wanted assignment is dropped: count unpicked tokens
        dropped = unrouted
    else:
        dropped = st["num_dropped"] / max(st["num_assignments"], 1)
    print(f"step {s:5d}  loss {loss:.5f}  load/expert {' '.join(f'{n:4d}' for n in load)}  "
          f"imbalance {imbalance:.3f}  dropped {dropped:.3f}  switch {st['switch_loss']:.3f}  "
          f"z {st['z_loss']:.3f}  aux {st['aux_loss']:.5f}", flush=True)
    if out:
        row = ([s, f"{loss:.6g}", st["num_tokens"]] + list(load) +
               list(st["tokens_per_expert"]) +
               [f"{v:.6g}" for v in (imbalance, st["imbalance"], dropped, unrouted,
                                     st["switch_loss"], st["importance_loss"], st["load_loss"],
                                     st["z_loss"], st["aux_loss"])] +
               [f"{v:.6g}" for v in model.layer.score_bias()])
        out.write(",".join(str(v) for v in row) + "\n")


def train(model, problem, a, stage, ev, out=None):
    rng = np.random.default_rng(a.seed * 1000003 + 5)  # the same batches for every model
    print(f"\n== {model.name}: E={model.E} K={model.K} ==")
    if out:
        out.write(csv_header(model.E) + "\n")
    run, nrun, t0 = 0.0, 0, time.perf_counter()
    for s in range(1, a.steps + 1):
        x, y, _ = problem.sample(rng, a.batch)
        run += model.forward(stage, x, y, True)
        nrun += 1
        model.backward_step(stage, y)
        if s % a.log_every == 0 or s == a.steps:
            log_step(model, a, s, run / nrun, out)
            run, nrun = 0.0, 0
    secs = time.perf_counter() - t0
    loss = model.forward(stage, ev[0], ev[1], False)
    print(f"{model.name}: held-out MSE {loss:.5f} after {a.steps} steps ({secs:.1f} s)")
    return loss


def specialisation(model, regime, R):
    """Regime x expert table of the last (held-out) forward; returns the mean over regimes of
    the largest fraction of the regime's processed assignments that one expert took (1.0: every
    regime goes to one expert)."""
    idx, _, kept = model.layer.routing()
    E = model.E
    frac = np.zeros((R, E))
    rows = np.broadcast_to(regime[:, None], idx.shape)
    np.add.at(frac, (rows[kept], idx[kept]), 1.0)
    frac /= np.maximum(frac.sum(axis=1), 1)[:, None]
    print("\nfraction of each regime's processed held-out assignments that each expert took:")
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
    noise = ("noisy " if a.noisy else "") + (
        "expert choice" if a.router == "expert_choice" else "top-k")
    print(f"train_mixture.py: {a.regimes} regimes, D={a.d_model}, targets {a.d_out}-dim from "
          f"per-regime tanh teachers (width 16); libmoe at {libmoe.lib_path()}")
    print(f"  MoE E={a.experts} K={a.top_k} F={a.d_ff} ({noise}) vs dense F={a.top_k * a.d_ff} "
          f"(same active parameters per token), {'SGD momentum 0.9' if a.sgd else 'Adam'}, "
          f"lr {a.lr:g}, {a.steps} steps x {a.batch} tokens, seed {a.seed}, backend {a.backend}")
    print(f"  balancing: strategy {a.strategy}, capacity factor {a.capacity_factor:g}, switch "
          f"{a.switch_coef:g}, importance {a.importance_coef:g}, load {a.load_coef:g}, z "
          f"{a.z_coef:g}, bias rate {a.bias_rate:g}")
    print(f"  held-out MSE of predicting the mean: {var:.5f}")
    out = open(a.csv, "w") if a.csv else None
    try:
        ctx = libmoe.Context(a.backend)
        stage = Staging(a.backend)
        moe = Model("moe", ctx, a, a.experts, a.top_k, a.d_ff,
                    np.random.default_rng(a.seed * 4099 + 11))
        moe_loss = train(moe, problem, a, stage, ev, out)
        purity, _ = specialisation(moe, ev[2], a.regimes)
        dense_loss = float("nan")
        if not a.no_dense:
            dense = Model("dense", ctx, a, 1, 1, a.top_k * a.d_ff,
                          np.random.default_rng(a.seed * 4099 + 11))
            dense_loss = train(dense, problem, a, stage, ev)
    except libmoe.MoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if out:
            out.close()
    print(f"\nfinal held-out MSE: moe {moe_loss:.5f}  dense {dense_loss:.5f}  (mean predictor "
          f"{var:.5f}); moe/dense {moe_loss / dense_loss:.3f}; specialisation {purity:.3f}")
    print(f"result strategy={a.strategy} capacity_factor={a.capacity_factor:g} "
          f"eval_mse={moe_loss:.6f} dense_mse={dense_loss:.6f} specialisation={purity:.4f}")
    if a.check:
        ok = moe_loss < a.threshold and (a.no_dense or moe_loss < dense_loss)
        print(f"check: moe {moe_loss:.5f} < threshold {a.threshold:.5f} and < dense "
              f"{dense_loss:.5f}: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
