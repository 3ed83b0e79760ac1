#!/usr/bin/env bash
# deps.sh - make sure the Debian packages a step needs are installed.
# usage: source scripts/deps.sh; moe_need_packages pkg...
# As root, missing packages are installed with apt-get; otherwise the exact install line is
# printed and the caller stops.
moe_need_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]}" >&2
        echo "install them with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        return 1
    fi
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || return 1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || return 1
}

# what building libmoe and its tests needs
# (pkg-config: the install test builds a consumer with it)
MOE_BUILD_PACKAGES=(cmake ninja-build g++ make libopenblas-openmp-dev libgtest-dev libopenmpi-dev
    openmpi-bin pkg-config)

# what the Python binding's tests need, for Debian's interpreter (the python3 first on PATH may
# be another one, without numpy): numpy and pytest; torch (1.13, CPU) for libmoe.torch and its
# training example; venv for the clean environment that `pip install .` is tested in
MOE_PYTHON_PACKAGES=(python3-numpy python3-pytest python3-torch python3-venv)

# what the hardening checks of scripts/test.sh need: clang with its runtime (libFuzzer and the
# sanitizers: libclang-rt-14-dev on Debian 12) and its OpenMP for scripts/fuzz.sh, valgrind for
# scripts/valgrind.sh
MOE_HARDENING_PACKAGES=(clang libclang-rt-14-dev libomp-dev valgrind)

# what the plots of scripts/lb-experiment need (for Debian's interpreter)
MOE_PLOT_PACKAGES=(python3-matplotlib)

# usage: py=$(moe_python module...) - the first interpreter that imports every module:
# $MOE_PYTHON if set, then Debian's /usr/bin/python3, then python3 on PATH
moe_python() {
    local py
    for py in "${MOE_PYTHON:-}" /usr/bin/python3 python3; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys; [__import__(m) for m in sys.argv[1:]]' "$@" 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    return 1
}
