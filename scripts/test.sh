#!/usr/bin/env bash
# test.sh - build libmoe (CUDA kernels included when nvcc is present) and run every test.
# usage: scripts/test.sh          the docs' cited paths (scripts/check-doc-paths.sh), a Release
#                                 build in build/, the whole suite through ctest, the Python
#                                 binding's pytest suite, then the hardening checks: the CPU
#                                 suite under ASan + UBSan + LeakSanitizer (--asan below), a
#                                 short run of every libFuzzer target (scripts/fuzz.sh) and one
#                                 valgrind pass over CPU test binaries (scripts/valgrind.sh)
#        scripts/test.sh --asan   AddressSanitizer + UBSan (+ LeakSanitizer) build in
#                                 build-asan/, the CPU suite
#        scripts/test.sh --quick  the first part only (no sanitizer, fuzz or valgrind pass)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# everything the suite needs, in one apt call up front (no test installs anything itself):
# the build, the Python binding's tests, and the plots of the load-balancing experiment's test
moe_need_packages "${MOE_BUILD_PACKAGES[@]}" "${MOE_PYTHON_PACKAGES[@]}" "${MOE_PLOT_PACKAGES[@]}" \
    "${MOE_HARDENING_PACKAGES[@]}"

# every file path the docs cite must exist (cheap, so it runs first)
scripts/check-doc-paths.sh

dir=build
args=(-DCMAKE_BUILD_TYPE=Release)
quick=0
[ "${1:-}" != "--quick" ] || quick=1
if [ "${1:-}" = "--asan" ]; then
    dir=build-asan
    # the sanitizer build checks the host code; CUDA kernels are checked by compute-sanitizer
    args=(-DCMAKE_BUILD_TYPE=Debug -DMOE_ENABLE_SANITIZERS=ON -DMOE_ENABLE_CUDA=OFF)
elif command -v nvcc >/dev/null 2>&1; then
    # the CUTLASS headers for the sm_90a grouped expert GEMMs: fetched once into a cache outside
    # the repository (a failed fetch fails here, so the CUTLASS build is never skipped silently)
    args+=("-DMOE_CUTLASS_DIR=$(scripts/cutlass-fetch.sh)")
fi
# the suite runs two test programs at a time on few cores: idle OpenMP threads must sleep,
# not spin, or they starve the busy ones (a test then takes seconds instead of milliseconds)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
cmake -S . -B "$dir" -G Ninja "${args[@]}" >/dev/null
cmake --build "$dir" -j "$(nproc)"
cd "$dir"
ctest --output-on-failure -j "$(nproc)"

# the Python binding (python/tests) against the libmoe.so just built, with an interpreter that
# has numpy, pytest and torch. Not in the sanitizer build: its libmoe.so needs libasan preloaded.
if [ "$dir" = build ]; then
    py=$(moe_python numpy pytest torch) ||
        { moe_need_packages "${MOE_PYTHON_PACKAGES[@]}" && py=$(moe_python numpy pytest torch); } ||
        { echo "no python3 that imports numpy, pytest and torch" >&2; exit 1; }
    # set -e: any pytest failure fails the script, including exit 5 (no tests collected)
    # one OpenMP thread: the layers here are tiny, where a second thread only waits (the
    # examples' ctest entry does the same)
    OMP_NUM_THREADS=1 LIBMOE_PATH="$PWD/libmoe.so" "$py" -m pytest -q -p no:cacheprovider ../python/tests

    # pip install . from a clean virtual environment (needs PyPI for scikit-build-core and
    # numpy); the wheel's libmoe.so is built CPU-only here, to keep the suite's time down: the
    # CUDA build was compiled and tested above
    vpy=$(moe_python venv ensurepip) || { echo "no python3 with venv and ensurepip" >&2; exit 1; }
    SKBUILD_CMAKE_DEFINE="MOE_ENABLE_CUDA=OFF" bash ../tests/install/pip.sh "$vpy" "$PWD/pip-test" \
        "$PWD/libmoe.so"
fi

# the hardening checks (docs/reliability.md), after the main suite: each fails the script
if [ "$dir" = build ] && [ "$quick" = 0 ]; then
    cd ..
    scripts/test.sh --asan           # ASan + UBSan + LeakSanitizer, the CPU suite
    MOE_FUZZ_SECONDS=${MOE_FUZZ_SECONDS:-20}
    scripts/fuzz.sh "$MOE_FUZZ_SECONDS" # every target of tests/fuzz, from its seed corpus
    # memcheck over CPU test binaries of a Release build without CUDA: with the CUDA backend in,
    # every test that probes for a GPU makes the CUDA runtime dlopen the driver, and memcheck
    # then reports the dynamic loader's own reads, not libmoe's
    cmake -S . -B build-valgrind -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_ENABLE_CUDA=OFF >/dev/null
    cmake --build build-valgrind -j "$(nproc)" --target test_api test_edge test_hardening \
        test_optim test_trace_read test_layer test_ep_local
    scripts/valgrind.sh build-valgrind
fi
