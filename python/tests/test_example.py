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
