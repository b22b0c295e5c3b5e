// Helpers of the wgmma prefill tests (test_cuda_flash_wgmma*.cpp): the DBRX shape, bounded waits,
// the Hopper check and a problem uploaded to the device.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#include "backend/cuda/flash_prefill_wgmma.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "flash_test_problem.h"
#include "util/error.h"

namespace dbrx::cuda::test {

constexpr int32_t kH = 48, kKV = 8, kHd = 128;  // DBRX
constexpr Shape kDbrx{kH, kKV, kHd};

// Waits for `stream` at most `limit_s`; a launch still running then is taken as a hang.
inline void wait_bounded(cudaStream_t stream, const char *what, double limit_s = 10.0) {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        const cudaError_t e = cudaStreamQuery(stream);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) DBRX_CUDA_CHECK(e);
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit_s) {
            std::fprintf(stderr, "FAIL: %s still running after %.0f s (hang?); exiting\n", what, limit_s);
            std::fflush(stdout);
            std::fflush(stderr);
            std::_Exit(3);
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
}

// False (the test skips) without a GPU or off Hopper; on a Hopper the build must hold the sm_90a kernel.
inline bool hopper_ready() {
    if (visible_gpus() == 0) return false;
    int dev = 0, major = 0, minor = 0;
    DBRX_CUDA_CHECK(cudaGetDevice(&dev));
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (major != 9 || minor != 0) return false;
    EXPECT_TRUE(flash_prefill_wgmma_supported(kHd, 16)) << "Hopper device, but no sm_90a kernel in this build";
    EXPECT_FALSE(flash_prefill_wgmma_supported(64, 16));
    EXPECT_FALSE(flash_prefill_wgmma_supported(kHd, 0));
    return flash_prefill_wgmma_supported(kHd, 16);
}

// Device copies of a problem (its cache in the problem's layout); run() launches one kernel (variant -2: flash_prefill, -1:
// flash_prefill_wgmma, else a wgmma shape) and returns the output.
struct DeviceProblem : DeviceInputs {
    Stream stream;
    explicit DeviceProblem(const Problem &p) : DeviceInputs(p) {
        // Pageable cudaMemcpy may return before its DMA lands; the launches run on a non-blocking stream.
        DBRX_CUDA_CHECK(cudaDeviceSynchronize());
    }
    void launch(int32_t variant) {
        const float *qp = q.as<float>();
        const int32_t *tp = tiles.as<int32_t>();
        if (variant == -2) flash_prefill(qp, n_tiles, H, tp, meta, kv, out.as<bf16_t>(), stream.get());
        else if (variant == -1) flash_prefill_wgmma(qp, n_tiles, H, tp, meta, kv, out.as<bf16_t>(), stream.get());
        else wgfa::prefill_variant(variant, qp, n_tiles, H, tp, meta, kv, out.as<bf16_t>(), stream.get());
    }
    std::vector<float> run(int32_t variant) {
        DBRX_CUDA_CHECK(cudaMemsetAsync(out.get(), 0xff, out.bytes(), stream.get()));  // NaN where a row is not written
        launch(variant);
        wait_bounded(stream.get(), name(variant));
        return output(name(variant));
    }
    // flash_prefill_wgmma with the tiles and metadata at `tp` / `m` (copies elsewhere), on stream `s`.
    std::vector<float> run_wgmma_on(const int32_t *tp, TokenMeta m, cudaStream_t s) {
        DBRX_CUDA_CHECK(cudaMemsetAsync(out.get(), 0xff, out.bytes(), s));
        flash_prefill_wgmma(q.as<float>(), n_tiles, H, tp, m, kv, out.as<bf16_t>(), s);
        wait_bounded(s, "flash_prefill_wgmma");
        return output("flash_prefill_wgmma");
    }
    static const char *name(int32_t variant) {
        return variant == -2 ? "flash_prefill" : variant == -1 ? "flash_prefill_wgmma" : wgfa::variant_name(variant);
    }
};

// The rows of heads `heads` (all rows) of `v` ([Tn][H][hd]).
inline std::vector<float> pick_heads(const std::vector<float> &v, int32_t Tn, std::span<const int32_t> heads) {
    std::vector<float> r;
    for (int32_t t = 0; t < Tn; ++t)
        for (int32_t h : heads) r.insert(r.end(), v.begin() + (int64_t{t} * kH + h) * kHd, v.begin() + (int64_t{t} * kH + h + 1) * kHd);
    return r;
}

}  // namespace dbrx::cuda::test
