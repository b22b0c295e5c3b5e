// The decode attention's merge-counter banks (attention_common.cuh): live streams never share one,
// a destroyed Stream gives its bank back, and past kCounterBanks live streams the call fails loudly
// instead of letting two streams corrupt each other's merges.
#include <gtest/gtest.h>

#include <memory>
#include <set>
#include <vector>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/cuda_util.h"
#include "util/error.h"

namespace dbrx::cuda {
namespace {

TEST(CudaAttentionBanks, LiveStreamsHoldDistinctBanksAndDestroyedOnesGiveThemBack) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        GTEST_SKIP() << "no CUDA device";
    }
    std::vector<std::unique_ptr<Stream>> live;
    std::vector<int32_t> banks;
    bool refused = false;
    // Earlier tests may hold banks (the legacy default stream never dies): take what is left.
    for (int i = 0; i <= attn::kCounterBanks && !refused; ++i) {
        auto s = std::make_unique<Stream>();
        try {
            banks.push_back(attn::counter_bank(s->get()));
            EXPECT_EQ(attn::counter_bank(s->get()), banks.back()) << "a stream keeps its bank";
            live.push_back(std::move(s));
        } catch (const Error &e) {
            EXPECT_EQ(e.status(), DBRX_ERR_UNSUPPORTED) << e.what();
            refused = true;
        }
    }
    EXPECT_TRUE(refused) << "more than kCounterBanks live streams must be refused";
    ASSERT_FALSE(banks.empty());
    EXPECT_EQ(std::set<int32_t>(banks.begin(), banks.end()).size(), banks.size()) << "two live streams share a bank";
    // Destroying a Stream frees its bank for the next one.
    const int32_t freed = banks.front();
    live.erase(live.begin());
    Stream next;
    EXPECT_EQ(attn::counter_bank(next.get()), freed);
}

}  // namespace
}  // namespace dbrx::cuda
