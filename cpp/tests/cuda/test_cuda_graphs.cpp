// CUDA graphs of the decode step: the graph cache's policy (eager first sight, capture, replay,
// invalidation, LRU, eager fallback after a failed capture) on small stream work, and the backend's
// decode steps with graphs on against graphs off on both fixtures (logits bitwise equal).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_graph.h"
#include "backend_seq.h"
#include "reference_fixture.h"

namespace dbrx::cuda::test {
namespace {

// ---- GraphCache on memsets: a replay shows the value frozen at capture ----

struct CacheRig {
    Stream stream;
    DeviceBuffer buf{sizeof(uint32_t), "graph test word"};
    GraphValidity validity{1, 1};
    int value = 0;

    std::function<GraphValidity()> valid() {
        return [this] { return validity; };
    }
    std::function<void()> memset_record() {
        return [this] { DBRX_CUDA_CHECK(cudaMemsetAsync(buf.get(), value, sizeof(uint32_t), stream.get())); };
    }
    uint32_t word() {
        uint32_t w = 0;
        DBRX_CUDA_CHECK(cudaMemcpyAsync(&w, buf.get(), sizeof w, cudaMemcpyDeviceToHost, stream.get()));
        DBRX_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
        return w;
    }
};

uint32_t bytes4(int v) { return 0x01010101u * static_cast<uint32_t>(v); }

TEST(CudaGraphCache, EagerThenCaptureThenReplay) {
    CacheRig r;
    GraphCache cache(4);
    const GraphKey key{1, 1, 256};
    r.value = 1;
    cache.run(key, r.stream.get(), r.valid(), r.memset_record());
    EXPECT_EQ(r.word(), bytes4(1));
    EXPECT_EQ(cache.stats().eager, 1);
    EXPECT_EQ(cache.stats().captures, 0);
    r.value = 2;  // captured with 2
    cache.run(key, r.stream.get(), r.valid(), r.memset_record());
    EXPECT_EQ(r.word(), bytes4(2));
    EXPECT_EQ(cache.stats().captures, 1);
    EXPECT_EQ(cache.stats().replays, 1);
    r.value = 3;  // a replay keeps the captured 2: record() is not called again
    cache.run(key, r.stream.get(), r.valid(), r.memset_record());
    EXPECT_EQ(r.word(), bytes4(2));
    EXPECT_EQ(cache.stats().replays, 2);
    EXPECT_EQ(cache.stats().cached, 1);
    // Moved addresses (another validity) drop the graph: eager again, then a new capture.
    r.validity.allocation_epoch = 2;
    r.value = 4;
    cache.run(key, r.stream.get(), r.valid(), r.memset_record());
    EXPECT_EQ(r.word(), bytes4(4));
    EXPECT_EQ(cache.stats().invalidations, 1);
    EXPECT_EQ(cache.stats().eager, 2);
    EXPECT_EQ(cache.stats().cached, 0);
    r.value = 5;
    cache.run(key, r.stream.get(), r.valid(), r.memset_record());
    EXPECT_EQ(r.word(), bytes4(5));
    EXPECT_EQ(cache.stats().captures, 2);
}

TEST(CudaGraphCache, EvictsLeastRecentlyUsed) {
    CacheRig r;
    GraphCache cache(2);
    for (int32_t n : {1, 2, 3})
        for (int i = 0; i < 2; ++i) {
            r.value = n;
            cache.run(GraphKey{n, n, 256}, r.stream.get(), r.valid(), r.memset_record());
        }
    EXPECT_EQ(cache.stats().captures, 3);
    EXPECT_EQ(cache.stats().evictions, 1);
    EXPECT_EQ(cache.stats().cached, 2);
    // Key 1 was evicted but is still known to be warm: it is captured again at once (with the current
    // value), which evicts key 2, the least recently used now.
    r.value = 9;
    cache.run(GraphKey{1, 1, 256}, r.stream.get(), r.valid(), r.memset_record());
    EXPECT_EQ(r.word(), bytes4(9));
    EXPECT_EQ(cache.stats().eager, 3);
    EXPECT_EQ(cache.stats().captures, 4);
    EXPECT_EQ(cache.stats().evictions, 2);
    // Key 3 is cached: its replay writes the captured 3.
    cache.run(GraphKey{3, 3, 256}, r.stream.get(), r.valid(), r.memset_record());
    EXPECT_EQ(r.word(), bytes4(3));
}

TEST(CudaGraphCache, FailedCaptureFallsBackToEagerAndIsReportedOnce) {
    CacheRig r;
    GraphCache cache(4);
    // A host synchronisation cannot be captured (as the cuBLAS MoE path's offset read-back).
    auto syncing = [&] {
        DBRX_CUDA_CHECK(cudaMemsetAsync(r.buf.get(), r.value, sizeof(uint32_t), r.stream.get()));
        DBRX_CUDA_CHECK(cudaStreamSynchronize(r.stream.get()));
    };
    auto throwing = [&] {
        DBRX_CUDA_CHECK(cudaMemsetAsync(r.buf.get(), r.value, sizeof(uint32_t), r.stream.get()));
        if (r.value == 7) throw std::runtime_error("refused during capture");
    };
    ::testing::internal::CaptureStderr();
    for (int v : {1, 2, 3}) {
        r.value = v;
        EXPECT_NO_THROW(cache.run(GraphKey{1, 1, 256}, r.stream.get(), r.valid(), syncing));
        EXPECT_EQ(r.word(), bytes4(v)) << "every step ran, eagerly";
    }
    r.value = 7;
    EXPECT_THROW(cache.run(GraphKey{2, 2, 256}, r.stream.get(), r.valid(), throwing), std::runtime_error)
        << "an eager run's own error propagates";
    r.value = 8;
    cache.run(GraphKey{2, 2, 256}, r.stream.get(), r.valid(), throwing);  // eager, warms key 2
    r.value = 7;
    EXPECT_THROW(cache.run(GraphKey{2, 2, 256}, r.stream.get(), r.valid(), throwing), std::runtime_error)
        << "capture failed, the eager fallback throws the error itself";
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_EQ(cache.stats().failures, 2);
    EXPECT_EQ(cache.stats().captures, 0);
    EXPECT_EQ(cache.stats().replays, 0);
    const std::string msg = "CUDA graph capture failed";
    const size_t at = err.find(msg);
    ASSERT_NE(at, std::string::npos) << err;
    EXPECT_EQ(err.find(msg, at + 1), std::string::npos) << "reported once: " << err;
    EXPECT_NE(err.find("1 tokens"), std::string::npos) << err;
    // The stream is usable and other shapes still capture.
    for (int v : {4, 5, 6}) {
        r.value = v;
        cache.run(GraphKey{3, 3, 256}, r.stream.get(), r.valid(), r.memset_record());
    }
    EXPECT_EQ(r.word(), bytes4(5));
    EXPECT_EQ(cache.stats().captures, 1);
}

// ---- the backend's decode steps, graphs on against off ----

struct Loaded {
    dbrx::testing::ReferenceFixture ref;
    std::unique_ptr<Backend> backend;
    CudaBackend *cuda = nullptr;

    explicit Loaded(const std::string &dir) : ref(dir) {
        backend = make_cuda_backend(*ref.ckpt, BackendOptions{}, nullptr, nullptr);
        cuda = dynamic_cast<CudaBackend *>(backend.get());
    }
    int32_t vocab() const { return ref.vocab(); }
};

constexpr int32_t kBlockSize = 16;

// B sequences prefilled with prompts of 248 - b tokens, then `steps` decode steps of one token each
// (teacher-forced ids), on a pool of their own. Returns the logits of every decode step, in order.
// With 12 steps the longest context goes from 249 to 260, across the 256 -> 512 context bucket.
std::vector<float> decode_run(Loaded &m, int32_t B, int32_t steps) {
    const int32_t V = m.vocab();
    const int32_t max_len = 248 + steps;
    const int32_t per_seq = (max_len + kBlockSize - 1) / kBlockSize;
    auto pool = m.backend->create_kv_pool(per_seq * B, kBlockSize);
    std::vector<std::vector<int32_t>> tables(B), prompts(B);
    std::vector<SeqStep> pre(B);
    for (int32_t b = 0; b < B; ++b) {
        tables[b] = dbrx::testing::sequential_blocks(b * per_seq, per_seq);
        prompts[b].resize(248 - b);
        for (size_t i = 0; i < prompts[b].size(); ++i) prompts[b][i] = static_cast<int32_t>((i * 31 + b * 7 + 5) % V);
        pre[b] = SeqStep{prompts[b], 0, tables[b], false};
    }
    std::vector<float> out(static_cast<size_t>(B) * V);
    m.backend->forward(*pool, pre, out.data());
    std::vector<float> all;
    std::vector<int32_t> tok(B);
    for (int32_t s = 0; s < steps; ++s) {
        std::vector<SeqStep> dec(B);
        for (int32_t b = 0; b < B; ++b) {
            tok[b] = (s * 13 + b * 17 + 3) % V;
            dec[b] = SeqStep{std::span<const int32_t>(&tok[b], 1), 248 - b + s, tables[b], true};
        }
        m.backend->forward(*pool, dec, out.data());
        all.insert(all.end(), out.begin(), out.end());
    }
    return all;
}

class CudaGraphs : public ::testing::TestWithParam<const char *> {};

TEST_P(CudaGraphs, DecodeLogitsBitwiseEqualWithGraphsOnAndOff) {
    Loaded m(std::string(DBRX_SOURCE_DIR) + GetParam());
    ASSERT_NE(m.cuda, nullptr);
    constexpr int32_t kSteps = 12;
    int32_t graphed = 0;
    for (int32_t B = 1; B <= 9; ++B) {
        m.cuda->set_cuda_graphs(false);
        const GraphStats before_off = m.cuda->graph_stats();
        const std::vector<float> eager = decode_run(m, B, kSteps);
        EXPECT_EQ(m.cuda->graph_stats().replays, before_off.replays) << "graphs off, B=" << B;
        m.cuda->set_cuda_graphs(true);
        const GraphStats before = m.cuda->graph_stats();
        const std::vector<float> graphs = decode_run(m, B, kSteps);
        const GraphStats after = m.cuda->graph_stats();
        ASSERT_EQ(eager.size(), graphs.size());
        size_t first_diff = eager.size();
        for (size_t i = 0; i < eager.size() && first_diff == eager.size(); ++i)
            if (std::memcmp(&eager[i], &graphs[i], sizeof(float)) != 0) first_diff = i;
        EXPECT_EQ(first_diff, eager.size()) << "B=" << B << ": first differing logit at step "
                                            << (first_diff / std::max<size_t>(1, size_t(B) * m.vocab())) << ": "
                                            << (first_diff < eager.size() ? eager[first_diff] : 0.f) << " vs "
                                            << (first_diff < eager.size() ? graphs[first_diff] : 0.f);
        if (m.cuda->graph_capturable(B)) {
            ++graphed;
            // Two context buckets (8 steps in 256, 4 in 512): each runs eagerly once, then replays.
            EXPECT_GE(after.captures - before.captures, 2) << "B=" << B;
            EXPECT_GE(after.replays - before.replays, kSteps - 4) << "B=" << B;
        } else {
            EXPECT_EQ(after.replays, before.replays) << "B=" << B << " is not capturable";
        }
        EXPECT_EQ(after.failures, 0) << "B=" << B;
    }
    EXPECT_GE(graphed, 8) << "every batch of up to 8 decodes is capturable";
}

TEST_P(CudaGraphs, NewKvPoolRebuildsGraphs) {
    Loaded m(std::string(DBRX_SOURCE_DIR) + GetParam());
    ASSERT_NE(m.cuda, nullptr);
    ASSERT_TRUE(m.cuda->cuda_graphs());
    const std::vector<float> first = decode_run(m, 4, 6);  // its pool is freed on return
    const GraphStats mid = m.cuda->graph_stats();
    EXPECT_GE(mid.replays, 4);
    EXPECT_GE(mid.cached, 1);
    const std::vector<float> second = decode_run(m, 4, 6);  // a new pool, perhaps at the same address
    const GraphStats end = m.cuda->graph_stats();
    EXPECT_GE(end.invalidations, mid.invalidations + 1) << "the new pool dropped the old graphs";
    EXPECT_GE(end.captures, mid.captures + 1) << "and captured new ones";
    EXPECT_GE(end.replays, mid.replays + 4);
    ASSERT_EQ(first.size(), second.size());
    EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)), 0);
}

TEST(CudaGraphsEnv, ZeroDisablesGraphs) {
    ::setenv("DBRX_CUDA_GRAPHS", "0", 1);
    Loaded m(std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx");
    ::unsetenv("DBRX_CUDA_GRAPHS");
    ASSERT_NE(m.cuda, nullptr);
    EXPECT_FALSE(m.cuda->cuda_graphs());
    decode_run(m, 2, 4);
    EXPECT_EQ(m.cuda->graph_stats().replays, 0);
    EXPECT_EQ(m.cuda->graph_stats().eager, 0) << "the graph cache is not consulted";
    m.cuda->set_cuda_graphs(true);
    decode_run(m, 2, 4);
    EXPECT_GE(m.cuda->graph_stats().replays, 2);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaGraphs, ::testing::Values("/fixtures/tiny-dbrx", "/models/tiny-dbrx-cl100k"),
                         [](const auto &info) { return std::string(info.index == 0 ? "tiny" : "cl100k"); });

}  // namespace
}  // namespace dbrx::cuda::test
