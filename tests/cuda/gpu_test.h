// gpu_test.h - how a GPU test finds out whether it can run: GTEST_SKIP() with the reason where
// no device is usable (cudaGetDeviceCount fails without a driver, or finds 0 devices).
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <string>

inline bool gpu_present(std::string *why) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        *why = std::string("no GPU: cudaGetDeviceCount returned ") + cudaGetErrorName(e);
        (void)cudaGetLastError();
        return false;
    }
    if (n == 0) {
        *why = "no GPU: cudaGetDeviceCount found 0 devices";
        return false;
    }
    return true;
}

#define REQUIRE_GPU()                                                                          \
    do {                                                                                       \
        std::string why_;                                                                      \
        if (!gpu_present(&why_)) GTEST_SKIP() << why_;                                        \
    } while (0)
