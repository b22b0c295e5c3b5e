// Host <-> device helpers and random inputs for the CUDA tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "backend/cuda/cuda_util.h"
#include "util/bf16.h"

namespace dbrx::cuda::test {

// CUDA devices this process sees (0 when the runtime finds none or fails).
inline int visible_gpus() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

template <class T> DeviceBuffer to_device(const std::vector<T> &v) {
    DeviceBuffer b(std::max<size_t>(1, v.size() * sizeof(T)), "test input");
    DBRX_CUDA_CHECK(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return b;
}

template <class T> std::vector<T> to_host(const void *p, size_t n) {
    std::vector<T> v(n);
    DBRX_CUDA_CHECK(cudaDeviceSynchronize());
    DBRX_CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

inline std::vector<float> uniform(size_t n, float lo, float hi, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (auto &x : v) x = u(rng);
    return v;
}

inline std::vector<bf16_t> to_bf16(const std::vector<float> &v) {
    std::vector<bf16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
    return b;
}

inline std::vector<float> to_f32(const std::vector<bf16_t> &v) {
    std::vector<float> f(v.size());
    for (size_t i = 0; i < v.size(); ++i) f[i] = bf16_to_float(v[i]);
    return f;
}

// max |a - b| / (max |b| + floor): one number per comparison, printed by the tests.
inline double rel_max_err(const std::vector<float> &a, const std::vector<float> &b, double floor = 1e-6) {
    double err = 0, mag = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
        mag = std::max(mag, std::fabs(static_cast<double>(b[i])));
    }
    return err / (mag + floor);
}

}  // namespace dbrx::cuda::test
