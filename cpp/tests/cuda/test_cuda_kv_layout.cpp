// The paged KV layouts (kernels.h: KvLayout, kv_layer, kv_offset): each covers its blocks once, the
// launchers refuse a KvLayer without strides, and the CUDA backend gives the same logits, bit for
// bit, whichever layout its pool has (the layout moves the keys, not the arithmetic).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <tuple>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/kernels.h"
#include "backend_seq.h"
#include "cuda_test_util.h"
#include "io/checkpoint.h"
#include "kv_layout_test_util.h"
#include "reference_fixture.h"
#include "util/error.h"

namespace dbrx::cuda::test {
namespace {

// Each layout puts every value of a block at exactly one (half, slot, head, dim); head-major keeps a
// head's slots contiguous, slot-major a slot's heads.
TEST(CudaKvLayout, EachLayoutCoversItsBlocksOnce) {
    for (KvLayout layout : kKvLayouts)
        for (auto [bs, KV, hd] : {std::tuple{16, 8, 128}, std::tuple{7, 3, 16}, std::tuple{1, 1, 8}}) {
            const KvLayer kv = kv_shape(bs, KV, hd, layout);
            std::vector<int> hits(static_cast<size_t>(2 * kv.block_stride), 0);  // two blocks
            for (int64_t b = 0; b < 2; ++b)
                for (int32_t j = 0; j < bs; ++j)
                    for (int32_t h = 0; h < KV; ++h)
                        for (int64_t half : {int64_t{0}, kv.v_offset})
                            for (int32_t i = 0; i < hd; ++i) ++hits[kv_offset(kv, b, j, h) + half + i];
            EXPECT_TRUE(std::all_of(hits.begin(), hits.end(), [](int n) { return n == 1; }))
                << kv_layout_name(layout) << " bs " << bs << " KV " << KV << " hd " << hd;
            EXPECT_NO_THROW(check_kv_layer(kv, "test"));
            if (layout == KvLayout::HeadMajor) EXPECT_EQ(kv_offset(kv, 1, bs - 1, 0) + hd, kv_offset(kv, 1, 0, 1));
            else EXPECT_EQ(kv_offset(kv, 1, 0, KV - 1) + hd, kv_offset(kv, 1, 1, 0));
        }
}

// Every launcher refuses a KvLayer without strides (aggregate-initialised the old way) before
// touching the device, rather than reading every key from row 0; so does check_kv_layer for strides
// of another block shape.
TEST(CudaKvLayout, LaunchersRefuseLayersWithoutStrides) {
    const int32_t bs = 16, KV = 8, hd = 128, H = 48;
    const int64_t half = int64_t{bs} * KV * hd;
    const KvLayer kv{nullptr, 2 * half, half, bs, KV, hd};
    const int32_t tiles[4] = {0, 0, 16, 0};
    EXPECT_THROW(check_kv_layer(kv, "test"), Error);
    EXPECT_THROW(qkv_epilogue(nullptr, 1, H, 0.f, nullptr, TokenMeta{}, kv, nullptr, nullptr), Error);
    EXPECT_THROW(attention(nullptr, 1, H, TokenMeta{}, kv, 16, 1, nullptr, nullptr, nullptr), Error);
    EXPECT_THROW(flash_prefill(nullptr, 1, H, tiles, TokenMeta{}, kv, nullptr, nullptr), Error);
    KvLayer wide = kv_layer(nullptr, bs, KV, hd, KvLayout::HeadMajor);
    wide.row_stride = half;  // slot 1 of K would start where V does
    EXPECT_THROW(check_kv_layer(wide, "test"), Error);
}

// tiny-dbrx's cases through the backend with a pool of each layout: prefill in chunks of 20 (flash
// attention), then greedy decodes (split-K attention, CUDA graphs); every step's logits the same bytes.
TEST(CudaKvLayout, TinyDbrxLogitsDoNotDependOnThePoolLayout) {
    if (visible_gpus() == 0) GTEST_SKIP() << "no CUDA device";
    constexpr int32_t kBs = 16, kDecodes = 4;
    dbrx::testing::ReferenceFixture f(std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx");
    auto backend = make_cuda_backend(*f.ckpt, BackendOptions{}, nullptr, nullptr);
    const ModelConfig &c = f.ckpt->config();
    for (size_t ci = 0; ci < f.cases.size(); ++ci) {
        const std::vector<int32_t> &prompt = f.cases[ci].prompt;
        const int32_t nb = static_cast<int32_t>((prompt.size() + kDecodes + kBs - 1) / kBs);
        std::vector<std::vector<float>> logits;
        for (KvLayout layout : kKvLayouts) {
            CudaKvPool pool(c, nb, kBs, layout);
            dbrx::testing::Seq seq{dbrx::testing::sequential_blocks(0, nb)};
            std::vector<float> all = dbrx::testing::prefill(*backend, pool, seq, prompt, 20, f.vocab());
            std::vector<float> last(all);
            for (int32_t i = 0; i < kDecodes; ++i) {
                const int32_t next = static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
                last = dbrx::testing::prefill(*backend, pool, seq, {next}, 0, f.vocab());
                all.insert(all.end(), last.begin(), last.end());
            }
            logits.push_back(std::move(all));
        }
        double diff = 0;
        for (size_t i = 0; i < logits[0].size(); ++i)
            diff = std::max(diff, std::fabs(static_cast<double>(logits[0][i]) - logits[1][i]));
        EXPECT_TRUE(logits[0] == logits[1]) << "case " << ci << " (prompt " << prompt.size()
                                            << "): head-major vs slot-major pool, max |logit diff| " << diff;
    }
}

}  // namespace
}  // namespace dbrx::cuda::test
