// The Hopper wgmma prefill kernel (flash_prefill_wgmma and its shapes) against cpu::attend_one and
// against flash_prefill (the mma.sync kernel): chunks of 1..300 rows over prefixes 0 and 1000, several
// sequences per launch, ragged tiles, odd block sizes, shapes refused on the host, then one long
// sequence at S=4096 and S=16384, timed against flash_prefill (test_cuda_flash_wgmma_strict.cpp has
// the strict per-row and backend-use checks). Every launch is waited for with a 10 s bound: a kernel
// that hangs ends the process with a message instead of stalling the run. The kernel checks run with
// the cache in each KV layout.
#include "flash_wgmma_test_util.h"

namespace dbrx::cuda::test {
namespace {

void check_chunks(int32_t bs, std::vector<Chunk> chunks, uint32_t seed) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    const Problem p = make_problem(kDbrx, bs, std::move(chunks), seed);
    constexpr int32_t kHeads[] = {0, 5, 6, 40, 47};
    Reference ref_of{p};
    std::vector<float> ref;
    std::vector<float> row(kHd);
    for (int32_t t = 0; t < p.n_tokens(); ++t)
        for (int32_t h : kHeads) {
            ref_of.attend(t, h, row.data());
            ref.insert(ref.end(), row.begin(), row.end());
        }
    for (KvLayout layout : kKvLayouts) {
        DeviceProblem d(in_layout(p, layout));
        const char *lname = kv_layout_name(layout);
        const auto base = d.run(-2);
        EXPECT_LT(rel_max_err(pick_heads(base, p.n_tokens(), kHeads), ref), 2e-2) << "flash_prefill, " << lname << " KV";
        for (int32_t v = -1; v < wgfa::variant_count(); ++v) {
            const auto got = d.run(v);
            const double err = rel_max_err(pick_heads(got, p.n_tokens(), kHeads), ref), diff = rel_max_err(got, base);
            std::printf("wgmma bs=%d tokens=%d tiles=%d %s, %s KV: max rel err %.2e vs cpu, %.2e vs flash_prefill\n",
                        bs, p.n_tokens(), d.n_tiles, DeviceProblem::name(v), lname, err, diff);
            EXPECT_LT(err, 2e-2) << DeviceProblem::name(v) << ", " << lname << " KV";  // bf16 Q and P
            EXPECT_LT(diff, 2e-2) << DeviceProblem::name(v) << ", " << lname << " KV";
        }
    }
}

TEST(CudaFlashWgmma, DbrxChunksPrefix0) {
    check_chunks(16, {{0, 1}, {0, 64}, {0, 127}, {0, 128}, {0, 129}, {0, 300}}, 51);
}
TEST(CudaFlashWgmma, DbrxChunksPrefix1000) {
    check_chunks(16, {{1000, 1}, {1000, 64}, {1000, 127}, {1000, 128}, {1000, 129}, {1000, 300}}, 52);
}
TEST(CudaFlashWgmma, MixedPrefixesAndBlockSizes) {
    check_chunks(16, {{37, 255}, {200, 129}, {1000, 17}, {5, 31}}, 53);
    check_chunks(7, {{0, 130}, {200, 45}}, 54);
    check_chunks(64, {{1000, 100}, {0, 70}}, 55);
}

// Shapes the kernel is not built for are refused on the host, before any launch.
TEST(CudaFlashWgmma, RejectsUnsupportedShapes) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    const Problem p = make_problem(kDbrx, 16, {{0, 20}}, 56);
    DeviceProblem d(p);
    KvLayer kv = d.kv;
    kv.head_dim = 64;
    EXPECT_THROW(flash_prefill_wgmma(d.q.as<float>(), d.n_tiles, kH, d.tiles.as<int32_t>(), d.meta, kv,
                                     d.out.as<bf16_t>(), d.stream.get()),
                 Error);
    kv = d.kv;
    kv.block_stride += 1;  // rows no longer 16-byte aligned
    EXPECT_THROW(flash_prefill_wgmma(d.q.as<float>(), d.n_tiles, kH, d.tiles.as<int32_t>(), d.meta, kv,
                                     d.out.as<bf16_t>(), d.stream.get()),
                 Error);
    kv = d.kv;
    kv.head_stride = kv.row_stride = 0;  // a KvLayer without its layout
    EXPECT_THROW(flash_prefill_wgmma(d.q.as<float>(), d.n_tiles, kH, d.tiles.as<int32_t>(), d.meta, kv,
                                     d.out.as<bf16_t>(), d.stream.get()),
                 Error);
    EXPECT_THROW(flash_prefill_wgmma(d.q.as<float>(), d.n_tiles, 47, d.tiles.as<int32_t>(), d.meta, d.kv,
                                     d.out.as<bf16_t>(), d.stream.get()),
                 Error);  // 47 query heads over 8 KV heads
    EXPECT_THROW(wgfa::prefill_variant(wgfa::variant_count(), d.q.as<float>(), d.n_tiles, kH, d.tiles.as<int32_t>(),
                                       d.meta, d.kv, d.out.as<bf16_t>(), d.stream.get()),
                 Error);
}

// Mean ms of `reps` launches after `warm` warm-ups, each batch bounded in time.
double time_ms(DeviceProblem &d, int32_t variant, int warm = 2, int reps = 5) {
    for (int i = 0; i < warm; ++i) d.launch(variant);
    wait_bounded(d.stream.get(), DeviceProblem::name(variant));
    cudaEvent_t e0, e1;
    DBRX_CUDA_CHECK(cudaEventCreate(&e0));
    DBRX_CUDA_CHECK(cudaEventCreate(&e1));
    DBRX_CUDA_CHECK(cudaEventRecord(e0, d.stream.get()));
    for (int i = 0; i < reps; ++i) d.launch(variant);
    DBRX_CUDA_CHECK(cudaEventRecord(e1, d.stream.get()));
    wait_bounded(d.stream.get(), DeviceProblem::name(variant));
    float ms = 0;
    DBRX_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    DBRX_CUDA_CHECK(cudaEventDestroy(e0));
    DBRX_CUDA_CHECK(cudaEventDestroy(e1));
    return ms / reps;
}

// One sequence of S tokens as one chunk, the cache in `layout`: sampled rows against the reference,
// the whole output against flash_prefill, and the times of flash_prefill and every wgmma shape
// (causal FLOPs).
void check_long(int32_t S, uint32_t seed, KvLayout layout) {
    const Problem p = make_problem(kDbrx, 16, {{0, S}}, seed, layout);
    const char *lname = kv_layout_name(layout);
    DeviceProblem d(p);
    const auto base = d.run(-2);
    Reference ref_of{p};
    std::vector<float> ref, row(kHd);
    const int32_t rows[] = {0, 1, 63, 64, 127, 128, 1000, S / 2 + 5, S - 129, S - 65, S - 2, S - 1};
    for (int32_t t : rows)
        for (int32_t h : {0, 5, 6, 40, 47}) {
            ref_of.attend(t, h, row.data());
            ref.insert(ref.end(), row.begin(), row.end());
        }
    auto sampled = [&](const std::vector<float> &got) {
        std::vector<float> sel;
        for (int32_t t : rows)
            for (int32_t h : {0, 5, 6, 40, 47}) {
                const auto *g = got.data() + (int64_t{t} * kH + h) * kHd;
                sel.insert(sel.end(), g, g + kHd);
            }
        return sel;
    };
    const double flops = 4.0 * kHd * kH * (static_cast<double>(S) * (S + 1) / 2);
    const double base_ms = time_ms(d, -2);
    std::printf("wgmma S=%d %s KV %-28s %.3f ms  %.0f TFLOP/s  sampled rows vs cpu %.2e\n", S, lname,
                "flash_prefill (mma.sync)", base_ms, flops / (base_ms * 1e-3) / 1e12, rel_max_err(sampled(base), ref));
    for (int32_t v = 0; v < wgfa::variant_count(); ++v) {
        const auto got = d.run(v);
        const double err = rel_max_err(sampled(got), ref), diff = rel_max_err(got, base);
        EXPECT_LT(err, 2e-2) << wgfa::variant_name(v) << ", " << lname << " KV";
        EXPECT_LT(diff, 2e-2) << wgfa::variant_name(v) << ", " << lname << " KV: differs from flash_prefill";
        const double ms = time_ms(d, v);
        std::printf("wgmma S=%d %s KV %-28s%s %.3f ms  %.0f TFLOP/s  x%.2f vs flash_prefill  (vs cpu %.1e, vs "
                    "flash_prefill %.1e)\n",
                    S, lname, wgfa::variant_name(v), v == wgfa::default_variant() ? " [default]" : "", ms,
                    flops / (ms * 1e-3) / 1e12, base_ms / ms, err, diff);
    }
}

TEST(CudaFlashWgmma, DbrxLongSequence4096) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    for (KvLayout layout : kKvLayouts) check_long(4096, 61, layout);
}
TEST(CudaFlashWgmma, DbrxLongSequence16384) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    for (KvLayout layout : kKvLayouts) check_long(16384, 62, layout);
}

}  // namespace
}  // namespace dbrx::cuda::test

