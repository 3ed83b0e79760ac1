"""test_torch.py - libmoe.torch.MoE against torch autograd of the equal pure-torch block
(libmoe.reference.TorchMoE): outputs and gradients, torch's accumulation semantics, optimizers,
state dicts, several layers, copies, errors; the CUDA path (skips without a GPU); and the
training example's CI run."""
import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import libmoe
import libmoe.torch
from libmoe import MoeError
from libmoe.reference import TorchMoE

# f32 on both sides, different summation orders: values and gradients of order 0.1-10
RTOL, ATOL = 1e-4, 1e-5


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def check_against_reference(moe, shape, seed=0):
    """forward and backward of moe and of TorchMoE.like(moe) on the same x and dy."""
    ref = TorchMoE.like(moe)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(moe.w1.device)
    w = torch.randn(*shape, generator=g).to(moe.w1.device)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = moe(x1), ref(x2)
    close(y1, y2, "y")
    assert moe.aux_loss == pytest.approx(float(ref.aux_loss), rel=1e-5, abs=1e-7)
    (y1 * w).sum().backward()
    ((y2 * w).sum() + ref.aux_loss).backward()
    close(x1.grad, x2.grad, "dx")
    names = [n for n, _ in moe.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters() if getattr(ref, n) is not None]
    for (n, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters()):
        close(p.grad, q.grad, n)
    return ref


@pytest.mark.parametrize("cfg", [
    dict(activation="gelu"),
    dict(activation="relu", gate="topk_of_softmax", renormalize=1),
    dict(activation="silu", gate="topk_of_softmax", renormalize=0, expert_bias=0),
    dict(activation="swiglu", capacity_factor=0.75, switch_loss_coef=0.1, z_loss_coef=0.01),
])
def test_gradients_match_torch_autograd(cfg):
    moe = libmoe.torch.MoE(12, 24, 6, 2, seed=5, **cfg)
    check_against_reference(moe, (3, 17, 12))
    if cfg.get("capacity_factor"):
        assert moe.stats()["num_dropped"] > 0  # the capacity did drop something


def test_parameters_alias_the_layer():
    moe = libmoe.torch.MoE(8, 16, 4, 2)
    for name, p in moe.named_parameters():
        view = moe._layer.param(name)
        assert p.data_ptr() == view.ctypes.data and tuple(p.shape) == view.shape
        assert isinstance(p, torch.nn.Parameter) and p.grad is None
    x = torch.randn(10, 8)
    y0 = moe(x)
    with torch.no_grad():
        moe.b2 += 1.0  # written through torch, seen by the C layer
    _, gate, _ = moe.routing()
    shift = np.repeat(gate.sum(axis=1, keepdims=True), 8, axis=1)  # sum of the token's gates
    close(moe(x) - y0, torch.from_numpy(shift), "b2 shift")
    moe(x).sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad.data_ptr() == moe._layer.grad(name).ctypes.data


def test_grad_accumulation_follows_torch():
    moe = libmoe.torch.MoE(8, 16, 4, 2, seed=3)
    ref = TorchMoE.like(moe)
    x = torch.randn(20, 8)
    for m in (moe, ref):
        for _ in range(2):  # two backward passes add up
            m(x).square().sum().backward()
    for (n, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters()):
        close(p.grad, q.grad, n)
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in moe.parameters())
    moe(x).square().sum().backward()  # starts from zero again, not from the stale buffer
    ref.zero_grad(set_to_none=True)
    ref(x).square().sum().backward()
    for (n, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters()):
        close(p.grad, q.grad, n)
    opt.zero_grad(set_to_none=False)  # in place
    assert all(float(p.grad.abs().max()) == 0.0 for p in moe.parameters())
    # a gradient the user assigned is added to, as torch does
    moe.w2.grad = torch.full_like(moe.w2, 0.5)
    moe.zero_grad(set_to_none=False)
    moe.w2.grad = torch.full_like(moe.w2, 0.5)
    moe(x).square().sum().backward()
    ref.zero_grad(set_to_none=True)
    ref(x).square().sum().backward()
    close(moe.w2.grad, ref.w2.grad + 0.5, "w2 plus the assigned gradient")
    # a frozen parameter gets no gradient
    moe.zero_grad(set_to_none=True)
    moe.router_weight.requires_grad_(False)
    moe(x).sum().backward()
    assert moe.router_weight.grad is None and moe.w1.grad is not None


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.Adam(p, lr=1e-2),
                                      lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)])
def test_torch_optimizers_train_the_layer(make_opt):
    moe = libmoe.torch.MoE(8, 16, 4, 2, seed=9, switch_loss_coef=0.01)
    ref = TorchMoE.like(moe)
    opts = [make_opt(moe.parameters()), make_opt(ref.parameters())]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, t = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
        for m, opt, aux in ((moe, opts[0], False), (ref, opts[1], True)):
            opt.zero_grad()
            loss = (m(x) - t).square().mean()
            if aux:
                loss = loss + m.aux_loss
            loss.backward()
            opt.step()
    for (n, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters()):
        close(p.detach(), q.detach(), n)
    # the C layer computes with what the optimizer wrote
    x = torch.randn(7, 8)
    close(moe(x), ref(x), "y after training")


def test_state_dict_round_trip():
    a = libmoe.torch.MoE(8, 16, 4, 2, seed=1)
    b = libmoe.torch.MoE(8, 16, 4, 2, seed=2)
    x = torch.randn(9, 8)
    assert not torch.allclose(a(x), b(x))
    sd = a.state_dict()
    assert sorted(sd) == ["b1", "b2", "router_weight", "w1", "w2"]
    b.load_state_dict(sd)
    ptr = b.w1.data_ptr()
    assert b.w1.data_ptr() == ptr == b._layer.param("w1").ctypes.data  # loaded in place
    close(a(x), b(x), "y after load_state_dict")
    # a state dict survives its module (it holds the layer's memory alive) and torch.save
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"libmoe-sd-{os.getpid()}.pt")
    torch.save(sd, path)
    del a
    c = libmoe.torch.MoE(8, 16, 4, 2, seed=3)
    c.load_state_dict(torch.load(path))
    os.remove(path)
    close(c(x), b(x), "y after torch.load")


def test_several_layers_in_one_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(libmoe.torch.MoE(8, 16, 4, 2, seed=1), torch.nn.Tanh(),
                                torch.nn.Linear(8, 8),
                                libmoe.torch.MoE(8, 12, 3, 1, seed=2, activation="silu"))
    ref = torch.nn.Sequential(TorchMoE.like(model[0]), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                              TorchMoE.like(model[3]))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 6, 8)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    close(model(x1), ref(x2), "y")
    model(x1).sum().backward()
    ref(x2).sum().backward()
    close(x1.grad, x2.grad, "dx")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        close(p.grad, q.grad, n)
    stats = [m.stats() for m in (model[0], model[3])]
    assert [s["num_tokens"] for s in stats] == [24, 24]
    assert [s["num_assignments"] for s in stats] == [48, 24]
    assert stats[1]["tokens_per_expert"].sum() == 24


def test_eval_inference_and_copies():
    moe = libmoe.torch.MoE(8, 16, 4, 2, noisy_gating=1, seed=4)
    x = torch.randn(16, 8)
    moe.eval()
    with torch.no_grad():
        y = moe(x)
    assert not y.requires_grad
    close(moe(x).detach(), y, "eval is deterministic (no noise)")
    twin = copy.deepcopy(moe)
    assert twin.w1.data_ptr() != moe.w1.data_ptr() and not twin.training
    close(twin(x).detach(), y, "deepcopy")
    with torch.no_grad():
        twin.w1.zero_()
    close(moe(x).detach(), y, "the copy is independent")
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(moe)
    y16 = moe(x.to(torch.float64))  # other input dtypes are converted in and out
    assert y16.dtype == torch.float64


def test_errors_are_python_exceptions_with_the_library_message():
    with pytest.raises(MoeError) as e:
        libmoe.torch.MoE(8, 16, 4, 5)
    assert e.value.status == libmoe.INVALID_ARGUMENT and "top_k" in e.value.message
    with pytest.raises(MoeError) as e:
        libmoe.torch.MoE(2**64 + 8, 16, 4, 2)
    assert "d_model" in e.value.message
    moe = libmoe.torch.MoE(8, 16, 4, 2)
    with pytest.raises(MoeError, match=r"expected \(\.\.\., 8\)"):
        moe(torch.randn(3, 7))
    x = torch.randn(3, 8)
    x[1, 1] = float("nan")
    with pytest.raises(MoeError) as e:
        moe(x)
    assert e.value.status == libmoe.NUMERIC_ERROR
    with pytest.raises(MoeError) as e:
        moe.to(torch.float64)
    assert e.value.status == libmoe.NOT_SUPPORTED
    with pytest.raises(MoeError) as e:
        moe.to(torch.bfloat16)  # the CPU backend holds float32 only
    assert e.value.status == libmoe.NOT_SUPPORTED
    assert moe.w1.dtype == torch.float32 and moe(torch.randn(2, 8)).shape == (2, 8)
    # one module called twice before backward: the older call's backward cannot be served
    y1 = moe(torch.randn(4, 8, requires_grad=True))
    y2 = moe(torch.randn(4, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="last forward"):
        (y1.sum() + y2.sum()).backward()


# ---- CUDA (skips without a GPU) ----------------------------------------------------------------

def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch sees no CUDA device")
    try:
        libmoe.Context("cuda")
    except MoeError as e:
        pytest.skip(f"libmoe has no CUDA backend here: {e.message}")


def test_cuda_module_matches_cpu_module():
    cuda_or_skip()
    cpu = libmoe.torch.MoE(16, 32, 4, 2, seed=6, activation="swiglu", switch_loss_coef=0.01)
    gpu = copy.deepcopy(cpu)
    params = list(gpu.parameters())
    gpu.to("cuda")
    assert [id(p) for p in gpu.parameters()] == [id(p) for p in params]  # same Parameters
    assert gpu.w1.is_cuda and gpu.w1.data_ptr() == gpu._layer.param_ptr("w1")[0]
    x = torch.randn(2, 40, 16)
    x1, x2 = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # x2's copy to the device
    with torch.cuda.stream(stream):  # the layer runs on torch's current stream
        y2 = gpu(x2)
        (y2 * 2).sum().backward()
    torch.cuda.synchronize()
    y1 = cpu(x1)
    (y1 * 2).sum().backward()
    close(y2.cpu(), y1.detach(), "y")
    close(x2.grad.cpu(), x1.grad, "dx")
    for (n, p), (_, q) in zip(gpu.named_parameters(), cpu.named_parameters()):
        assert p.grad.data_ptr() == gpu._layer.param_ptr(n)[1]
        close(p.grad.cpu(), q.grad, n)
    opt = torch.optim.Adam(gpu.parameters(), lr=1e-2)
    opt.step()
    back = copy.deepcopy(gpu).to("cpu")
    close(back.w1.detach(), gpu.w1.detach().cpu(), "to('cpu') after a step")
    bf = libmoe.torch.MoE(16, 32, 4, 2, device="cuda", dtype=torch.bfloat16)
    assert bf.w1.dtype == torch.bfloat16
    out = bf(torch.randn(8, 16, device="cuda"))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- the training example ------------------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples",
                       "train_torch_lm.py")


def test_torch_lm_example_matches_pure_torch():
    env = dict(os.environ, LIBMOE_PATH=libmoe.lib_path(),
               PYTHONPATH=os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
                   libmoe.__file__)), os.environ.get("PYTHONPATH")] if p))
    env.setdefault("OMP_NUM_THREADS", "1")
    r = subprocess.run([sys.executable, EXAMPLE, "--steps", "60", "--check"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: PASS" in r.stdout and "step time" in r.stdout
