// The fused MoE layer (router GEMM, top-k, device permutation, expert GEMVs, grouped GEMMs or
// cuBLAS GEMMs, weighted un-permute into the residual) against cpu::route + cpu::moe_experts, at
// the real DBRX shape (16 experts of 10752, d 6144, top-4) and at the fixtures' shapes.
#include <gtest/gtest.h>

#include <cstdio>

#include "backend/cpu/kernels.h"
#include "backend/cuda/device_model.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/moe.h"
#include "cuda_test_util.h"

namespace dbrx::cuda::test {
namespace {

const char *path_name(MoePath p) {
    switch (p) {
    case MoePath::Gemv: return "gemv";
    case MoePath::Grouped: return "grouped";
    case MoePath::Gemm: return "gemm";
    default: return "auto";
    }
}

struct MoeCase {
    MoeShape shape;
    DeviceBuffer router, w13, w2;
    std::vector<bf16_t> h_router, h_w1, h_v1, h_w2;  // CPU layout: [E*F][d] each

    explicit MoeCase(const MoeShape &s) : shape(s) {
        const int64_t d = s.d_model, F = s.ffn, E = s.n_experts;
        router = DeviceBuffer(sizeof(bf16_t) * E * d);
        w13 = DeviceBuffer(sizeof(bf16_t) * E * 2 * F * d);
        w2 = DeviceBuffer(sizeof(bf16_t) * E * F * d);
        fill_uniform(router.as<bf16_t>(), E * d, 1, 0.f, 0.5f, nullptr);
        fill_uniform(w13.as<bf16_t>(), E * 2 * F * d, 2, 0.f, 1.f / std::sqrt(static_cast<float>(d)), nullptr);
        fill_uniform(w2.as<bf16_t>(), E * F * d, 3, 0.f, 1.f / std::sqrt(static_cast<float>(F)), nullptr);
        h_router = to_host<bf16_t>(router.get(), E * d);
        auto w13h = to_host<bf16_t>(w13.get(), E * 2 * F * d);
        h_w2 = to_host<bf16_t>(w2.get(), E * F * d);
        h_w1.resize(E * F * d);
        h_v1.resize(E * F * d);
        for (int64_t e = 0; e < E; ++e) {
            std::copy_n(w13h.begin() + e * 2 * F * d, F * d, h_w1.begin() + e * F * d);
            std::copy_n(w13h.begin() + e * 2 * F * d + F * d, F * d, h_v1.begin() + e * F * d);
        }
    }

    void check(int32_t T, MoePath path, uint32_t seed) {
        const int32_t d = shape.d_model, E = shape.n_experts, k = shape.top_k;
        auto x = to_bf16(uniform(static_cast<size_t>(T) * d, -2.f, 2.f, seed));
        auto h0 = uniform(static_cast<size_t>(T) * d, -1.f, 1.f, seed + 1);
        auto dx = to_device(x);
        auto dh = to_device(h0);
        Stream stream;
        CublasHandle blas(stream.get());
        Moe moe(shape);
        MoeWeights w{router.as<bf16_t>(), w13.as<bf16_t>(), w2.as<bf16_t>()};
        moe.forward(dx.as<bf16_t>(), T, w, dh.as<float>(), blas.get(), stream.get(), path);
        DBRX_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
        auto got_h = to_host<float>(dh.get(), static_cast<size_t>(T) * d);
        auto got_e = to_host<int32_t>(moe.experts(), static_cast<size_t>(T) * k);
        auto got_w = to_host<float>(moe.weights(), static_cast<size_t>(T) * k);

        // CPU: router logits from the same bf16 input, routing compared, then the experts run with
        // the GPU's routing so a near-tie cannot make the comparison meaningless.
        ThreadPool pool(0);
        auto xf = to_f32(x);
        std::vector<float> logits(static_cast<size_t>(T) * E);
        cpu::gemm_xwt(xf.data(), T, d, h_router.data(), E, logits.data(), pool);
        std::vector<int32_t> re(k);
        std::vector<float> rw(k);
        int32_t mismatched = 0;
        for (int32_t t = 0; t < T; ++t) {
            const float *lt = logits.data() + int64_t{t} * E;
            cpu::route(lt, E, k, shape.norm_p > 0 ? std::optional<double>(shape.norm_p) : std::nullopt, re.data(),
                       rw.data());
            for (int32_t r = 0; r < k; ++r) {
                const int32_t ge = got_e[t * k + r];
                if (re[r] == ge) {
                    EXPECT_NEAR(rw[r], got_w[t * k + r], 2e-3);
                    continue;
                }
                // Only a near-tie of the two logits (summation order) may swap a choice.
                ++mismatched;
                ASSERT_TRUE(ge >= 0 && ge < E) << "token " << t << " rank " << r;
                EXPECT_LT(std::fabs(lt[re[r]] - lt[ge]), 1e-3f)
                    << "token " << t << " rank " << r << ": GPU chose expert " << ge << ", CPU " << re[r];
            }
        }
        std::vector<float> ref_h = h0;
        cpu::moe_experts(xf.data(), T, d, shape.ffn, E, k, got_e.data(), got_w.data(), h_w1.data(), h_v1.data(),
                         h_w2.data(), ref_h.data(), pool);
        std::vector<float> got_delta(got_h.size()), ref_delta(got_h.size());
        for (size_t i = 0; i < got_h.size(); ++i) {
            got_delta[i] = got_h[i] - h0[i];
            ref_delta[i] = ref_h[i] - h0[i];
        }
        const double err = rel_max_err(got_delta, ref_delta);
        std::printf("moe d=%d F=%d E=%d k=%d T=%d path=%s: max rel err %.2e (%d routing mismatches)\n", d,
                    shape.ffn, E, k, T, path_name(path), err, mismatched);
        EXPECT_LT(err, 2e-2);
    }
};

MoeShape shape(int32_t d, int32_t F, int32_t E, int32_t k) {
    MoeShape s;
    s.d_model = d;
    s.ffn = F;
    s.n_experts = E;
    s.top_k = k;
    s.norm_p = 1.f;
    return s;
}

TEST(CudaMoe, DbrxShape) {
    MoeCase c(shape(6144, 10752, 16, 4));
    c.check(1, MoePath::Gemv, 31);
    c.check(4, MoePath::Gemv, 32);
    c.check(8, MoePath::Gemv, 33);
    c.check(4, MoePath::Gemm, 34);
    c.check(24, MoePath::Gemm, 35);
    // Grouped GEMMs in 64-row passes (T <= 64) and 256-row passes (T = 200); the 128-row variant
    // runs against cuBLAS at T = 128 below, several passes at the tiny shape.
    for (int32_t T : {9, 16, 64, 200}) c.check(T, MoePath::Grouped, 36 + T);
}

TEST(CudaMoe, AutoPathIsCapturableUpToTheCublasCrossover) {
    Moe dbrx(shape(6144, 10752, 16, 4));
    for (int32_t T = 1; T <= 4096; ++T) {
        const MoePath want = T <= kMoeAutoGemvMaxTokens     ? MoePath::Gemv
                             : T <= kMoeAutoGroupedMaxTokens ? MoePath::Grouped
                                                             : MoePath::Gemm;
        ASSERT_EQ(dbrx.resolve(T), want) << "T=" << T;
        ASSERT_EQ(dbrx.capturable(T), want != MoePath::Gemm) << "T=" << T;
    }
    // Shapes off the tiles fall back to cuBLAS above the GEMV range.
    Moe small(shape(32, 64, 16, 4));
    EXPECT_TRUE(small.capturable(kMoeGemvMaxRows));
    EXPECT_EQ(small.resolve(kMoeGemvMaxRows), MoePath::Gemv);
    EXPECT_FALSE(small.capturable(kMoeGemvMaxRows + 1));
    EXPECT_EQ(small.resolve(kMoeGemvMaxRows + 1), MoePath::Gemm);
}

TEST(CudaMoe, TinyFixtureShape) {
    MoeCase c(shape(256, 192, 4, 2));
    for (int32_t T : {1, 3, 8}) c.check(T, MoePath::Gemv, 40 + T);
    for (int32_t T : {1, 37, 130}) c.check(T, MoePath::Gemm, 50 + T);
    // T = 1: two of the four experts get no rows; 100: 128-row passes; 700: experts of about 350
    // rows take two 256-row passes.
    for (int32_t T : {1, 2, 9, 37, 100, 130, 300, 700}) c.check(T, MoePath::Grouped, 80 + T);
    c.check(20, MoePath::Auto, 99);
}

TEST(CudaMoe, Cl100kFixtureShape) {
    MoeCase c(shape(32, 64, 16, 4));
    for (int32_t T : {1, 2, 7}) c.check(T, MoePath::Gemv, 60 + T);
    for (int32_t T : {9, 70}) c.check(T, MoePath::Gemm, 70 + T);
    c.check(33, MoePath::Auto, 75);  // d 32 is off the grouped tile: Auto takes cuBLAS
    EXPECT_THROW(c.check(9, MoePath::Grouped, 76), Error);
}

// The grouped kernels against cuBLAS per expert on the same routing at DBRX width, from the decode
// sizes up to prefill chunks, all paths timed: the figures behind Auto's kMoeAuto*MaxTokens.
TEST(CudaMoe, GroupedMatchesCublasAcrossTokenCounts) {
    const int64_t d = 6144, F = 10752, E = 16;
    const MoeShape s = shape(static_cast<int32_t>(d), static_cast<int32_t>(F), static_cast<int32_t>(E), 4);
    DeviceBuffer router(sizeof(bf16_t) * E * d), w13(sizeof(bf16_t) * E * 2 * F * d), w2(sizeof(bf16_t) * E * F * d);
    fill_uniform(router.as<bf16_t>(), E * d, 11, 0.f, 0.5f, nullptr);
    fill_uniform(w13.as<bf16_t>(), E * 2 * F * d, 12, 0.f, 0.0128f, nullptr);
    fill_uniform(w2.as<bf16_t>(), E * F * d, 13, 0.f, 0.0096f, nullptr);
    const MoeWeights w{router.as<bf16_t>(), w13.as<bf16_t>(), w2.as<bf16_t>()};
    const int32_t max_t = 4096;
    DeviceBuffer x(sizeof(bf16_t) * max_t * d), h(sizeof(float) * max_t * d);
    fill_uniform(x.as<bf16_t>(), max_t * d, 14, 0.f, 1.f, nullptr);
    Stream stream;
    CublasHandle blas(stream.get());
    Moe moe(s);
    cudaEvent_t t0, t1;
    DBRX_CUDA_CHECK(cudaEventCreate(&t0));
    DBRX_CUDA_CHECK(cudaEventCreate(&t1));
    // Average time of `iters` forwards after one warm-up; h ends as h0 + iters + 1 deltas.
    auto run = [&](int32_t T, MoePath p, int iters) {
        DBRX_CUDA_CHECK(cudaMemsetAsync(h.get(), 0, sizeof(float) * T * d, stream.get()));
        moe.forward(x.as<bf16_t>(), T, w, h.as<float>(), blas.get(), stream.get(), p);
        DBRX_CUDA_CHECK(cudaMemsetAsync(h.get(), 0, sizeof(float) * T * d, stream.get()));
        DBRX_CUDA_CHECK(cudaEventRecord(t0, stream.get()));
        for (int i = 0; i < iters; ++i) moe.forward(x.as<bf16_t>(), T, w, h.as<float>(), blas.get(), stream.get(), p);
        DBRX_CUDA_CHECK(cudaEventRecord(t1, stream.get()));
        DBRX_CUDA_CHECK(cudaEventSynchronize(t1));
        float ms = 0;
        DBRX_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
        auto out = to_host<float>(h.get(), static_cast<size_t>(T) * d);
        for (auto &v : out) v /= static_cast<float>(iters);
        return std::make_pair(static_cast<double>(ms) / iters, out);
    };
    for (int32_t T : {1, 4, 8, 16, 32, 64, 128, 200, 512, 1024, 2048, 4096}) {
        const int iters = T <= 512 ? 10 : 3;
        const auto [ms_c, ref] = run(T, MoePath::Gemm, iters);
        const auto [ms_g, got] = run(T, MoePath::Grouped, iters);
        const double ms_v = T <= kMoeGemvMaxRows ? run(T, MoePath::Gemv, iters).first : 0.0;
        const double err = rel_max_err(got, ref);
        std::printf("moe T=%d: cublas %.3f ms, grouped %.3f ms, gemv %.3f ms, auto=%s; grouped vs cublas max rel "
                    "err %.2e\n",
                    T, ms_c, ms_g, ms_v, path_name(moe.resolve(T)), err);
        EXPECT_LT(err, 1e-2) << "T=" << T;
    }
    DBRX_CUDA_CHECK(cudaEventDestroy(t0));
    DBRX_CUDA_CHECK(cudaEventDestroy(t1));
}

}  // namespace
}  // namespace dbrx::cuda::test
