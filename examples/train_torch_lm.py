#!/usr/bin/env python3
"""train_torch_lm.py - a small transformer language model whose feed-forward blocks are libmoe
layers (libmoe.torch.MoE), trained side by side with the same model built on a pure-torch MoE
block of equal weights (libmoe.reference.TorchMoE): same initial weights, same batches, same
optimizer. The two loss curves agree step by step within --tol, and each step's time is
reported for both.

The text is Python's own documentation as it ships with the standard library
(pydoc_data/topics.py, about 470k characters): nothing is downloaded. Characters are the tokens.

  train_torch_lm.py --steps 60 --check          the CI run (CPU, under half a minute on 2 cores)
  train_torch_lm.py --device cuda --steps 500   on a GPU (libmoe built with CUDA)
"""
import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import libmoe
import libmoe.torch
from libmoe.reference import TorchMoE


def load_text():
    import pydoc_data.topics as topics
    return "\n".join(topics.topics[k] for k in sorted(topics.topics))


class Attention(torch.nn.Module):
    """Causal multi-head self-attention, written out (torch 1.13 has no fused kernel for it)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.heads)
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, S, D))


class Block(torch.nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn, self.ffn = Attention(d, heads), ffn

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class LM(torch.nn.Module):
    def __init__(self, vocab, seq, d, heads, ffns):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(d, heads, f) for f in ffns)
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))

    def moe_layers(self):
        return [b.ffn for b in self.blocks]


def batches(data, steps, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in start.tolist()])
        y = torch.stack([data[s + 1:s + seq + 1] for s in start.tolist()])
        yield x, y


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, opt, x, y, aux_from_autograd):
    """One training step; returns (cross entropy, aux loss) as floats."""
    logits = model(x)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if aux_from_autograd:  # the pure-torch block: its aux loss is part of the graph
        aux = sum(m.aux_loss for m in model.moe_layers())
        loss, aux = ce + aux, float(aux)
    else:  # libmoe: backward adds the aux loss gradient itself; the value is for logging
        loss = ce
        aux = sum(m.aux_loss for m in model.moe_layers())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(ce), aux


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=128)
    ap.add_argument("--activation", default="gelu", choices=["relu", "gelu", "silu", "swiglu"])
    ap.add_argument("--switch-loss", type=float, default=1e-2, help="Switch loss coefficient")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="largest allowed |loss difference| between the two models at any step")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless the curves agree within --tol and the loss falls")
    a = ap.parse_args()

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("train_torch_lm.py: this PyTorch sees no CUDA device", file=sys.stderr)
        return 3
    device = torch.device(a.device)
    text = load_text()
    chars = sorted(set(text))
    code = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([code[c] for c in text], dtype=torch.long)
    torch.manual_seed(a.seed)
    moe_cfg = dict(activation=a.activation, switch_loss_coef=a.switch_loss)
    lib_ffns = [libmoe.torch.MoE(a.d_model, a.d_ff, a.experts, a.top_k, seed=a.seed + i,
                                 device=device, **moe_cfg) for i in range(a.layers)]
    lib = LM(len(chars), a.seq, a.d_model, a.heads, lib_ffns).to(device)
    ref = LM(len(chars), a.seq, a.d_model, a.heads,
             [TorchMoE.like(m) for m in lib_ffns]).to(device)
    ref.load_state_dict(lib.state_dict())  # equal weights everywhere
    opts = [torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.01) for m in (lib, ref)]
    print(f"text: pydoc_data/topics.py, {len(text)} characters, vocabulary {len(chars)}")
    print(f"model: {a.layers} blocks, d_model {a.d_model}, {a.heads} heads, MoE {a.experts} "
          f"experts top-{a.top_k} d_ff {a.d_ff} {a.activation}, seq {a.seq}, batch {a.batch}, "
          f"device {device}, torch {torch.__version__}, libmoe {'.'.join(map(str, libmoe.version()))}")
    print(f"{'step':>5} {'loss libmoe':>12} {'loss torch':>11} {'|diff|':>9} {'aux libmoe':>11} "
          f"{'aux torch':>10} {'ms libmoe':>10} {'ms torch':>9}")
    times = ([], [])
    worst, first, last = 0.0, None, []
    for s, (x, y) in enumerate(batches(data, a.steps, a.batch, a.seq, a.seed), 1):
        x, y = x.to(device), y.to(device)
        out = []
        for i, (model, opt) in enumerate(zip((lib, ref), opts)):
            sync(device)
            t0 = time.perf_counter()
            out.append(step(model, opt, x, y, aux_from_autograd=(i == 1)))
            sync(device)
            times[i].append(time.perf_counter() - t0)
        (ce_l, aux_l), (ce_r, aux_r) = out
        diff = abs(ce_l - ce_r)
        worst = max(worst, diff)
        first = ce_l if first is None else first
        last = (last + [ce_l])[-10:]
        if s % a.log_every == 0 or s == 1 or s == a.steps:
            print(f"{s:5d} {ce_l:12.5f} {ce_r:11.5f} {diff:9.2e} {aux_l:11.5f} {aux_r:10.5f} "
                  f"{1e3 * times[0][-1]:10.1f} {1e3 * times[1][-1]:9.1f}")
    # the first steps include one-time allocations: medians over the rest
    skip = min(3, a.steps - 1)
    ms = [1e3 * statistics.median(t[skip:]) for t in times]
    tok = a.batch * a.seq
    print(f"step time (median, forward + backward + AdamW): libmoe {ms[0]:.1f} ms "
          f"({tok / ms[0] * 1e3:.0f} tokens/s), pure torch {ms[1]:.1f} ms "
          f"({tok / ms[1] * 1e3:.0f} tokens/s); the MoE blocks are the only difference")
    print(f"largest |loss difference| over {a.steps} steps: {worst:.2e} (tolerance {a.tol:g}); "
          f"loss {first:.4f} -> {statistics.mean(last):.4f} (mean of the last {len(last)})")
    if a.check:
        ok = worst <= a.tol and statistics.mean(last) < first - 0.5
        print(f"check: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
