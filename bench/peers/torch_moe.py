#!/usr/bin/env python3
"""torch_moe.py - the PyTorch peers of moe_bench: the same MoE layer written the way people write
it in PyTorch, timed on the same shapes.

Peers
  naive    router linear, top-k, softmax over the k selected logits, then a Python loop over the
           experts: index_select the rows routed to the expert, run its MLP (bias, activation,
           bias), scale by the gate weight and index_add_ into the output. The common baseline.
  grouped  (CUDA only, where torch._grouped_mm exists) the experts as two grouped GEMMs over an
           expert-major permutation of the rows, in bf16 (what _grouped_mm supports).

Timing: `warmup` untimed iterations, then `iters` timed ones of forward (autograd on, as in
training) + backward (y.backward(dy): gradients of every parameter and of x), the forward also
timed on its own inside the same iteration, exactly as moe_bench does; medians are reported.
Prints one line per peer and mode in a fixed "key value" form that scripts/bench-peers.sh parses,
and --json writes the same numbers.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as Fn


def act_fn(name):
    return {"relu": Fn.relu, "gelu": Fn.gelu, "silu": Fn.silu}[name]


class NaiveMoE(torch.nn.Module):
    """One MoE layer, the textbook way: loop over experts with index_select / index_add_."""

    def __init__(self, d, f, e, k, activation, device, dtype):
        super().__init__()
        self.k, self.activation = k, activation
        f2 = 2 * f if activation == "swiglu" else f
        self.router = torch.nn.Linear(d, e, bias=False, device=device, dtype=dtype)
        b1, b2 = 1.0 / d ** 0.5, 1.0 / f ** 0.5
        self.w1 = torch.nn.Parameter(torch.empty(e, d, f2, device=device, dtype=dtype).uniform_(-b1, b1))
        self.b1 = torch.nn.Parameter(torch.empty(e, f2, device=device, dtype=dtype).uniform_(-b1, b1))
        self.w2 = torch.nn.Parameter(torch.empty(e, f, d, device=device, dtype=dtype).uniform_(-b2, b2))
        self.b2 = torch.nn.Parameter(torch.empty(e, d, device=device, dtype=dtype).uniform_(-b2, b2))

    def mlp(self, i, xe):
        h = torch.addmm(self.b1[i], xe, self.w1[i])
        if self.activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            a = Fn.silu(g) * u
        else:
            a = act_fn(self.activation)(h)
        return torch.addmm(self.b2[i], a, self.w2[i])

    def forward(self, x):
        logits = self.router(x)                                  # (T, E)
        top, idx = torch.topk(logits, self.k, dim=-1)            # (T, K)
        gate = torch.softmax(top, dim=-1)                        # softmax over the K selected
        y = torch.zeros_like(x)
        flat_idx, flat_gate = idx.reshape(-1), gate.reshape(-1)
        tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.k)
        for i in range(self.w1.shape[0]):
            sel = (flat_idx == i).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            rows = tok.index_select(0, sel)
            out = self.mlp(i, x.index_select(0, rows)) * flat_gate.index_select(0, sel).unsqueeze(1)
            y = y.index_add(0, rows, out)
        return y


class GroupedMoE(NaiveMoE):
    """The experts as two torch._grouped_mm calls over expert-major rows (CUDA, bf16)."""

    def forward(self, x):
        logits = self.router(x)
        top, idx = torch.topk(logits, self.k, dim=-1)
        gate = torch.softmax(top, dim=-1)
        flat_idx = idx.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        tok = order // self.k
        counts = torch.bincount(flat_idx, minlength=self.w1.shape[0])
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x.index_select(0, tok)
        h = torch._grouped_mm(xs, self.w1, offs=offs)
        h = h + self.b1.repeat_interleave(counts, dim=0, output_size=xs.shape[0])
        if self.activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            a = Fn.silu(g) * u
        else:
            a = act_fn(self.activation)(h)
        o = torch._grouped_mm(a, self.w2, offs=offs)
        o = o + self.b2.repeat_interleave(counts, dim=0, output_size=xs.shape[0])
        o = o * gate.reshape(-1).index_select(0, order).unsqueeze(1)
        return torch.zeros_like(x).index_add(0, tok, o)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_mode(layer, x, dy, mode, warmup, iters, device):
    """Per timed iteration: (forward seconds, forward [+ backward] seconds). In fwd-bwd mode the
    forward is timed inside the same iteration, as moe_bench does."""
    fwd, total = [], []
    for it in range(warmup + iters):
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        sync(device)
        t0 = time.perf_counter()
        y = layer(x)
        sync(device)
        t1 = time.perf_counter()
        if mode == "fwd-bwd":
            y.backward(dy)
            sync(device)
        t2 = time.perf_counter()
        if it >= warmup:
            fwd.append(t1 - t0)
            total.append(t2 - t0)
    return fwd, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--activation", default="gelu", choices=["relu", "gelu", "silu", "swiglu"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--mode", default="fwd-bwd", choices=["fwd", "fwd-bwd"],
                    help="fwd: forward only; fwd-bwd: forward (timed on its own too) + backward")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--peer", default="naive", choices=["naive", "grouped", "all"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("torch_moe.py: CUDA is not available to this PyTorch", file=sys.stderr)
        return 3
    torch.manual_seed(a.seed)
    peers = ["naive", "grouped"] if a.peer == "all" else [a.peer]
    if "grouped" in peers and not (a.device == "cuda" and hasattr(torch, "_grouped_mm")):
        print("# peer grouped: skipped (needs CUDA and torch._grouped_mm)", file=sys.stderr)
        peers.remove("grouped")
        if not peers:
            return 3

    print("# torch_moe.py: torch %s  device %s  threads %d  T %d  D %d  F %d  E %d  K %d  %s"
          % (torch.__version__, a.device, torch.get_num_threads(), a.tokens, a.d_model, a.d_ff,
             a.experts, a.top_k, a.activation))
    results = []
    for peer in peers:
        dtype = torch.bfloat16 if peer == "grouped" else torch.float32
        cls = GroupedMoE if peer == "grouped" else NaiveMoE
        layer = cls(a.d_model, a.d_ff, a.experts, a.top_k, a.activation, a.device, dtype)
        x = (torch.rand(a.tokens, a.d_model, device=a.device, dtype=dtype) * 2 - 1).requires_grad_()
        dy = torch.full((a.tokens, a.d_model), 1.0 / a.d_model, device=a.device, dtype=dtype)
        tf, tt = time_mode(layer, x, dy, a.mode, a.warmup, a.iters, a.device)
        for mode, t in (("fwd", tf), ("fwd-bwd", tt)):
            if mode == "fwd-bwd" and a.mode == "fwd":
                continue
            med, mean = statistics.median(t), statistics.fmean(t)
            r = {"peer": peer, "mode": mode, "tokens": a.tokens, "median_ms": 1e3 * med,
                 "mean_ms": 1e3 * mean, "min_ms": 1e3 * min(t), "tokens_per_s": a.tokens / med,
                 "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "device": a.device}
            results.append(r)
            print("peer %s mode %s tokens %d median_ms %.3f mean_ms %.3f tokens_per_s %.1f"
                  % (peer, mode, a.tokens, r["median_ms"], r["mean_ms"], r["tokens_per_s"]))
            sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tool": "torch_moe.py", "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
