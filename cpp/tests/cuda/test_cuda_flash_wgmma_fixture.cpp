// Both prefill flash kernels on real rows: tiny-dbrx's 130-token prompt (its 4th reference case), run
// through the CUDA backend, leaves its last layer's queries and K/V cache on the device; every row of
// every head is held against cpu::attend_one on exactly those inputs, and the kernels against each
// other. Then the whole backend with each kernel, compared where the kernels' outputs first meet the
// rest of the model: the last layer's K/V, per position.
#include <algorithm>
#include <cstdio>

#include "backend/cuda/cuda_backend.h"
#include "backend_seq.h"
#include "flash_wgmma_test_util.h"
#include "io/checkpoint.h"
#include "reference_fixture.h"

namespace dbrx::cuda::test {
namespace {

constexpr int32_t kBs = 16;

// tiny-dbrx on the CUDA backend, with its 130-token prompt (case 3): n positions in nb blocks, and the
// last layer's index.
struct Loaded : dbrx::testing::ReferenceFixture {
    std::unique_ptr<Backend> backend;
    CudaBackend *cuda = nullptr;
    const std::vector<int32_t> &prompt;
    const int32_t n, nb, last;
    Loaded()
        : ReferenceFixture(std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx"), prompt(cases.at(3).prompt),
          n(static_cast<int32_t>(prompt.size())), nb((n + kBs - 1) / kBs), last(ckpt->config().n_layers - 1) {
        backend = make_cuda_backend(*ckpt, BackendOptions{}, nullptr, nullptr);
        cuda = dynamic_cast<CudaBackend *>(backend.get());
        EXPECT_NE(cuda, nullptr);
    }
};

// Prefills `prompt` in one chunk with `k` into blocks 0.. of a fresh pool; returns the pool.
std::unique_ptr<KvPool> prefill_with(Loaded &f, CudaBackend::FlashKernel k, const std::vector<int32_t> &prompt,
                                     int32_t n_blocks) {
    f.cuda->set_flash_kernel(k);
    auto pool = f.backend->create_kv_pool(n_blocks, kBs);
    dbrx::testing::Seq seq{dbrx::testing::sequential_blocks(0, n_blocks)};
    dbrx::testing::prefill(*f.backend, *pool, seq, prompt, 0, f.vocab());
    f.cuda->set_flash_kernel(CudaBackend::FlashKernel::Auto);
    return pool;
}

// On a Hopper GPU only (both kernels run).
class CudaFlashTinyDbrx : public ::testing::Test {
protected:
    void SetUp() override {
        if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
        loaded = std::make_unique<Loaded>();
        ASSERT_NE(loaded->cuda, nullptr);
    }
    std::unique_ptr<Loaded> loaded;
};

// Layer l of the pool as it lies in device memory (in the pool's KV layout).
std::vector<bf16_t> layer_cache(KvPool &pool, int32_t l) {
    const KvLayer kv = dynamic_cast<CudaKvPool &>(pool).layer(l);
    return to_host<bf16_t>(kv.base, static_cast<size_t>(pool.n_blocks()) * kv.block_stride);
}

TEST_F(CudaFlashTinyDbrx, RealRowsMatchTheReference) {
    Loaded &f = *loaded;
    const ModelConfig &c = f.ckpt->config();
    const int32_t n = f.n;
    auto pool = prefill_with(f, CudaBackend::FlashKernel::MmaSync, f.prompt, f.nb);
    DBRX_CUDA_CHECK(cudaStreamSynchronize(f.cuda->stream()));

    // The last layer's attention inputs as a Problem (one chunk of n rows over no prefix).
    const Shape s{c.n_heads, c.n_kv_heads, c.head_dim};
    Problem p = make_problem(s, kBs, {{0, n}}, 1);
    std::iota(p.blocks.begin(), p.blocks.end(), 0);
    p.layout = dynamic_cast<CudaKvPool &>(*pool).layout();
    p.cache = layer_cache(*pool, f.last);
    p.q = to_host<float>(f.cuda->device_queries(), static_cast<size_t>(n) * s.H * s.hd);
    Reference ref_of{p};
    DeviceProblem d(p);
    const auto mma = d.run(-2), wg = d.run(-1);
    double worst_mma = 0, worst_wg = 0, worst_between = 0;
    int32_t bad = 0;
    std::vector<float> ref(s.hd);
    for (int32_t t = 0; t < n; ++t)
        for (int32_t h = 0; h < s.H; ++h) {
            ref_of.attend(t, h, ref.data());
            const int64_t o = (int64_t{t} * s.H + h) * s.hd;
            double mag = 1e-3, e_mma = 0, e_wg = 0, e_between = 0;
            for (int32_t i = 0; i < s.hd; ++i) {
                mag = std::max(mag, std::fabs(static_cast<double>(ref[i])));
                e_mma = std::max(e_mma, std::fabs(static_cast<double>(mma[o + i]) - ref[i]));
                e_wg = std::max(e_wg, std::fabs(static_cast<double>(wg[o + i]) - ref[i]));
                e_between = std::max(e_between, std::fabs(static_cast<double>(wg[o + i]) - mma[o + i]));
            }
            worst_mma = std::max(worst_mma, e_mma / mag);
            worst_wg = std::max(worst_wg, e_wg / mag);
            worst_between = std::max(worst_between, e_between / mag);
            if (e_wg > 2e-2 * mag && bad++ < 6)
                ADD_FAILURE() << "wgmma row pos " << t << " head " << h << ": " << e_wg << " off the reference (|row| "
                              << mag << "; mma.sync " << e_mma << ")";
        }
    std::printf("tiny-dbrx case 3, layer %d rows: worst row rel err mma.sync %.2e, wgmma %.2e, between %.2e\n", f.last,
                worst_mma, worst_wg, worst_between);
    EXPECT_LE(worst_mma, 2e-2);
    EXPECT_LE(worst_wg, 2e-2);
}

// The backend with each kernel: the last layer's K/V rows (made from the first layers' outputs) per
// position, and the logits. Differences here are the first layers' attention outputs carried through
// LayerNorm, the router and the experts.
TEST_F(CudaFlashTinyDbrx, BackendKernelsAgreePerPosition) {
    Loaded &f = *loaded;
    const ModelConfig &c = f.ckpt->config();
    const int32_t n = f.n, last = f.last;
    using K = CudaBackend::FlashKernel;
    auto a = prefill_with(f, K::MmaSync, f.prompt, f.nb);
    auto b = prefill_with(f, K::Wgmma, f.prompt, f.nb);
    auto b2 = prefill_with(f, K::Wgmma, f.prompt, f.nb);
    DBRX_CUDA_CHECK(cudaStreamSynchronize(f.cuda->stream()));
    const auto ka = to_f32(layer_cache(*a, last)), kb = to_f32(layer_cache(*b, last));
    EXPECT_TRUE(layer_cache(*b, last) == layer_cache(*b2, last)) << "two wgmma prefills differ";
    const KvLayer kv = dynamic_cast<CudaKvPool &>(*a).layer(last);
    std::vector<std::pair<double, int32_t>> by_pos;
    for (int32_t t = 0; t < n; ++t) {
        double diff = 0, mag = 1e-3;
        for (int32_t h = 0; h < c.n_kv_heads; ++h)
            for (int64_t o : {kv_offset(kv, t / kBs, t % kBs, h), kv_offset(kv, t / kBs, t % kBs, h) + kv.v_offset})
                for (int32_t i = 0; i < c.head_dim; ++i) {
                    diff = std::max(diff, std::fabs(static_cast<double>(ka[o + i]) - kb[o + i]));
                    mag = std::max(mag, std::fabs(static_cast<double>(ka[o + i])));
                }
        by_pos.push_back({diff / mag, t});
    }
    std::sort(by_pos.rbegin(), by_pos.rend());
    std::printf("layer %d K/V, mma.sync vs wgmma prefill, largest per-position rel diffs:", last);
    for (int i = 0; i < 8; ++i) std::printf(" pos %d %.2e;", by_pos[i].second, by_pos[i].first);
    std::printf("\n");
    // Last logits of every case by each prefill kernel (split-K: flash off), against each other and the
    // float64 reference.
    for (size_t ci = 0; ci < f.cases.size(); ++ci) {
        const auto &pr = f.cases[ci].prompt;
        const int32_t nbc = static_cast<int32_t>((pr.size() + kBs - 1) / kBs);
        std::vector<std::vector<float>> got;
        for (int k = 0; k < 3; ++k) {
            f.cuda->set_flash_prefill(k < 2);
            f.cuda->set_flash_kernel(k == 0 ? CudaBackend::FlashKernel::MmaSync : CudaBackend::FlashKernel::Wgmma);
            auto pool = f.backend->create_kv_pool(nbc, kBs);
            dbrx::testing::Seq seq{dbrx::testing::sequential_blocks(0, nbc)};
            got.push_back(dbrx::testing::prefill(*f.backend, *pool, seq, pr, 0, f.vocab()));
        }
        f.cuda->set_flash_prefill(true);
        f.cuda->set_flash_kernel(CudaBackend::FlashKernel::Auto);
        auto diff = [](const std::vector<float> &x, const std::vector<float> &y) {
            double m = 0;
            for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(x[i]) - y[i]));
            return m;
        };
        const auto ref = f.last_logits(ci);
        std::printf("case %zu (prompt %zu): vs ref mma.sync %.4f wgmma %.4f split-K %.4f; mma-wgmma %.4f mma-splitK %.4f "
                    "wgmma-splitK %.4f\n",
                    ci, pr.size(), diff(got[0], ref), diff(got[1], ref), diff(got[2], ref), diff(got[0], got[1]),
                    diff(got[0], got[2]), diff(got[1], got[2]));
    }
}

}  // namespace
}  // namespace dbrx::cuda::test
