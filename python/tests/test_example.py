"""test_example.py - examples/train_mixture.py converges: --check at a CI size."""
import os
import subprocess
import sys

import pytest

import libmoe

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples",
                       "train_mixture.py")


@pytest.mark.parametrize("seed", [1, 2])
def test_train_mixture_converges_and_beats_dense(seed):
    env = dict(os.environ, LIBMOE_PATH=libmoe.lib_path())
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny layers: a second thread only waits
    r = subprocess.run([sys.executable, EXAMPLE, "--check", "--steps", "600", "--seed",
                        str(seed)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: " in r.stdout and "PASS" in r.stdout
    assert "specialisation" in r.stdout


@pytest.mark.parametrize("strategy", ["loss-free", "expert-choice"])
def test_train_mixture_strategy_csv(strategy, tmp_path):
    # the load-balancing record: one row per logged step, the loads add up to what the experts
    # computed (expert choice: every expert fills its C = T*K/E slots)
    env = dict(os.environ, LIBMOE_PATH=libmoe.lib_path())
    env.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "run.csv"
    r = subprocess.run([sys.executable, EXAMPLE, "--strategy", strategy, "--steps", "40",
                        "--log-every", "10", "--no-dense", "--capacity-factor", "1",
                        "--csv", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"result strategy={strategy} " in r.stdout
    lines = out.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:3] == ["step", "loss", "tokens"] and "dropped_frac" in header
    rows = [dict(zip(header, map(float, ln.split(",")))) for ln in lines[1:]]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for row in rows:
        load = [row[f"load_{e}"] for e in range(4)]
        if strategy == "expert-choice":
            assert load == [64.0] * 4 and row["imbalance"] == 1.0
        else:
            assert sum(load) == pytest.approx(256 * (1 - row["dropped_frac"]), abs=0.01)
