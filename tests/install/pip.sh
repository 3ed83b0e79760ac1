#!/usr/bin/env bash
# pip.sh - `pip install .` into a fresh virtual environment (no system site packages): pip
# fetches scikit-build-core, which builds libmoe.so with CMake into the package; then the
# installed package is checked from outside the source tree, on its own library and with
# $LIBMOE_PATH pointing at another build.
# usage: tests/install/pip.sh PYTHON WORK_DIR [OTHER_LIBMOE_SO]
#   CMake definitions for the wheel's build come from $SKBUILD_CMAKE_DEFINE (e.g.
#   "MOE_ENABLE_CUDA=OFF"); WORK_DIR/pip-build keeps the build between runs.
set -euo pipefail
py=$1
work=$2
other=${3:-}
root=$(cd "$(dirname "$0")/../.." && pwd)
check=$root/tests/install/pip_check.py
venv=$work/venv
rm -rf "$venv"
mkdir -p "$work"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$root" \
    --config-settings=build-dir="$work/pip-build"
cd "$work" # away from the source tree, whose python/ must not be what is imported
env -u LIBMOE_PATH "$venv/bin/python" "$check"
if [ -n "$other" ]; then
    LIBMOE_PATH=$other "$venv/bin/python" "$check" --expect-lib "$other"
fi
echo "pip install: OK"
