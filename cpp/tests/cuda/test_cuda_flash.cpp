// Prefill flash attention (flash_prefill and its CTA-shape variants) against cpu::attend_one: chunks
// of 1..300 rows over cached prefixes, several sequences per launch, ragged last tiles, odd block
// sizes, every head dim the backend sends to it; then the long-sequence cases at the DBRX shape,
// checked on sampled rows and timed per variant. Every case runs with the cache in each KV layout.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <span>

#include "backend/cuda/flash_prefill_variants.cuh"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "flash_test_problem.h"
#include "kv_layout_test_util.h"

namespace dbrx::cuda::test {
namespace {

// Device copies of a problem and one launch of flash_prefill (variant < 0) or a variant.
struct DeviceProblem : DeviceInputs {
    using DeviceInputs::DeviceInputs;
    std::vector<float> run(int32_t variant) {
        DBRX_CUDA_CHECK(cudaMemset(out.get(), 0xff, out.bytes()));  // NaN wherever a row is not written
        if (variant < 0) flash_prefill(q.as<float>(), n_tiles, H, tiles.as<int32_t>(), meta, kv, out.as<bf16_t>(), nullptr);
        else flash::prefill_variant(variant, q.as<float>(), n_tiles, H, tiles.as<int32_t>(), meta, kv, out.as<bf16_t>(), nullptr);
        return output("variant " + std::to_string(variant));
    }
};

// Every row and head against the reference, for flash_prefill and (head dim 128) every variant, with
// the cache in each KV layout.
void check_all(Shape s, int32_t bs, std::vector<Chunk> chunks, uint32_t seed) {
    ASSERT_TRUE(flash_prefill_supported(s.hd));
    const Problem p = make_problem(s, bs, std::move(chunks), seed);
    Reference ref_of{p};
    std::vector<float> ref(p.q.size());
    for (int32_t t = 0; t < p.n_tokens(); ++t)
        for (int32_t h = 0; h < s.H; ++h) ref_of.attend(t, h, ref.data() + (int64_t{t} * s.H + h) * s.hd);
    for (KvLayout layout : kKvLayouts) {
        DeviceProblem d(in_layout(p, layout));
        const int32_t n_variants = s.hd == 128 ? flash::variant_count() : 0;
        for (int32_t v = -1; v < n_variants; ++v) {
            const char *name = v < 0 ? "flash_prefill" : flash::variant_name(v);
            const double err = rel_max_err(d.run(v), ref);
            std::printf("flash H=%d KV=%d hd=%d bs=%d tokens=%d tiles=%d %s, %s KV: max rel err %.2e\n", s.H, s.KV,
                        s.hd, bs, p.n_tokens(), d.n_tiles, name, kv_layout_name(layout), err);
            EXPECT_LT(err, 2e-2) << name << ", " << kv_layout_name(layout) << " KV";  // bf16 Q and P
        }
    }
}

constexpr Shape kDbrx{48, 8, 128};

TEST(CudaFlash, DbrxChunksOverPrefixes) {
    check_all(kDbrx, 16, {{0, 300}, {200, 129}, {1000, 17}, {0, 1}, {200, 128}, {1000, 64}, {37, 255}}, 31);
}
TEST(CudaFlash, DbrxSmallChunks) {
    check_all(kDbrx, 16, {{0, 16}, {200, 1}, {1000, 2}, {5, 31}, {1000, 127}}, 32);
}
TEST(CudaFlash, OddBlockSizes) {
    check_all(kDbrx, 7, {{0, 130}, {200, 45}}, 33);
    check_all(kDbrx, 64, {{1000, 100}, {0, 70}}, 34);
    check_all({8, 2, 64}, 1, {{13, 140}}, 35);
}
TEST(CudaFlash, FixtureShapes) {
    check_all({2, 1, 128}, 16, {{0, 130}, {60, 300}}, 36);  // tiny-dbrx
    check_all({2, 1, 16}, 16, {{0, 70}, {8, 200}}, 37);     // tiny-dbrx-cl100k
}
TEST(CudaFlash, HeadDims32And64) {
    check_all({4, 2, 32}, 16, {{0, 150}, {300, 40}}, 38);
    check_all({16, 4, 64}, 16, {{0, 257}, {129, 16}}, 39);
}

// One sequence of S tokens prefilled as one chunk at the DBRX shape, the cache in `layout`: sampled
// rows against the reference, every variant against flash_prefill, and the time of each (causal
// FLOPs counted).
void check_long(int32_t S, uint32_t seed, KvLayout layout) {
    const Problem p = make_problem(kDbrx, 16, {{0, S}}, seed, layout);
    DeviceProblem d(p);
    const auto got = d.run(-1);
    Reference ref_of{p};
    std::vector<float> sel, ref;
    std::vector<float> row(kDbrx.hd);
    for (int32_t t : {0, 1, 63, 127, 128, 1000, S / 2 + 5, S - 129, S - 2, S - 1})
        for (int32_t h : {0, 5, 6, 40, 47}) {
            ref_of.attend(t, h, row.data());
            ref.insert(ref.end(), row.begin(), row.end());
            const auto *g = got.data() + (int64_t{t} * kDbrx.H + h) * kDbrx.hd;
            sel.insert(sel.end(), g, g + kDbrx.hd);
        }
    const double err = rel_max_err(sel, ref);
    std::printf("flash S=%d %s KV sampled rows: max rel err %.2e\n", S, kv_layout_name(layout), err);
    EXPECT_LT(err, 2e-2);

    const double flops = 4.0 * kDbrx.hd * kDbrx.H * (static_cast<double>(S) * (S + 1) / 2);
    cudaEvent_t e0, e1;
    DBRX_CUDA_CHECK(cudaEventCreate(&e0));
    DBRX_CUDA_CHECK(cudaEventCreate(&e1));
    for (int32_t v = 0; v < flash::variant_count(); ++v) {
        const double diff = rel_max_err(d.run(v), got);
        // Variants with other key-tile widths move the lazy max at other keys, so P and the output
        // round to bf16 differently; beyond that they compute the same thing.
        EXPECT_LT(diff, 1e-2) << flash::variant_name(v) << " differs from flash_prefill";
        const int reps = S >= 16384 ? 3 : 10;
        DBRX_CUDA_CHECK(cudaEventRecord(e0));
        for (int i = 0; i < reps; ++i)
            flash::prefill_variant(v, d.q.as<float>(), d.n_tiles, d.H, d.tiles.as<int32_t>(), d.meta, d.kv,
                                   d.out.as<bf16_t>(), nullptr);
        DBRX_CUDA_CHECK(cudaEventRecord(e1));
        DBRX_CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        DBRX_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        ms /= reps;
        std::printf("flash S=%d %s KV %-40s%s %.3f ms  %.0f TFLOP/s  (vs flash_prefill %.1e)\n", S,
                    kv_layout_name(layout), flash::variant_name(v), v == flash::default_variant() ? " [default]" : "",
                    ms, flops / (ms * 1e-3) / 1e12, diff);
    }
    DBRX_CUDA_CHECK(cudaEventDestroy(e0));
    DBRX_CUDA_CHECK(cudaEventDestroy(e1));
}

TEST(CudaFlash, DbrxLongSequence4096) {
    for (KvLayout layout : kKvLayouts) check_long(4096, 41, layout);
}
TEST(CudaFlash, DbrxLongSequence16384) {
    for (KvLayout layout : kKvLayouts) check_long(16384, 42, layout);
}

}  // namespace
}  // namespace dbrx::cuda::test
