"""pip_check.py - the libmoe package as pip installed it: imported from the environment (not a
source tree), the shared library found inside the package (or where $LIBMOE_PATH points), and
one layer forward and backward through it.
usage: python pip_check.py [--expect-lib PATH]"""
import os
import sys

import numpy as np

import libmoe


def main():
    expect = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--expect-lib" else None
    pkg = os.path.dirname(os.path.realpath(libmoe.__file__))
    assert os.path.realpath(sys.prefix) in pkg, f"libmoe imported from {pkg}, not {sys.prefix}"
    lib = os.path.realpath(libmoe.lib_path())
    want = os.path.realpath(expect) if expect else os.path.join(pkg, "libmoe.so")
    assert lib == want, f"libmoe.so loaded from {lib}, expected {want}"
    ctx = libmoe.Context("cpu")
    layer = libmoe.Layer(ctx, d_model=8, d_ff=16, num_experts=4, top_k=2)
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    y = layer.forward(x)
    dx = layer.backward(y)
    assert y.shape == dx.shape == (10, 8) and np.isfinite(dx).all()
    assert layer.stats()["num_assignments"] == 20
    try:
        libmoe.Layer(ctx, d_model=8, d_ff=16, num_experts=4, top_k=5)
        raise AssertionError("top_k > num_experts was accepted")
    except libmoe.MoeError as e:
        assert "top_k" in e.message
    print(f"pip package: libmoe {'.'.join(map(str, libmoe.version()))} from {pkg}, "
          f"library {lib}: OK")


if __name__ == "__main__":
    main()
