// The sharded CPU backend against the one-rank CPU backend on both fixtures: tp 2/3/4, ep 2/4 and
// tp 2 x ep 2 give the same last logits (within 1e-5) and the same greedy ids through the paged
// KV cache; several sequences in one step gather their logits rows correctly; a rank that fails or
// stalls mid-run makes the step fail with ENGINE_DEAD naming it, within a bounded time; each rank
// runs on the same thread of its own on every step (rank 0 on the caller's).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dist/sharded_cpu_backend.h"
#include "io/checkpoint.h"
#include "model/backend.h"
#include "reference_fixture.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;

constexpr int32_t kBlockSize = 16;
constexpr float kShardTolerance = 1e-5f;
constexpr double kMarginFloor = 1e-2;  // reference greedy ids are binding where the margin exceeds it
constexpr size_t kGreedySteps = 24;  // every reference greedy step of both fixtures

const char *const kFixtures[] = {DBRX_SOURCE_DIR "/fixtures/tiny-dbrx", DBRX_SOURCE_DIR "/models/tiny-dbrx-cl100k"};

using dbrx::testing::load_ref_cases;
using dbrx::testing::RefCase;

int32_t argmax(const std::vector<float> &v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

float max_abs_diff(const std::vector<float> &a, const std::vector<float> &b) {
    float m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
}

// One sequence's decoding state in one backend's pool.
struct SeqRun {
    Backend &backend;
    std::unique_ptr<KvPool> pool;
    std::vector<int32_t> blocks;
    int32_t cached = 0;

    SeqRun(Backend &b, int32_t max_len) : backend(b) {
        const int32_t n_blocks = (max_len + kBlockSize - 1) / kBlockSize;
        pool = b.create_kv_pool(n_blocks + 2, kBlockSize);
        // Physical blocks in reverse, so block tables are exercised beyond the identity map.
        for (int32_t i = 0; i < n_blocks; ++i) blocks.push_back(n_blocks + 1 - i);
    }

    // Feeds tokens in chunks of `chunk` and returns the logits of the last one.
    std::vector<float> feed(const std::vector<int32_t> &tokens, size_t chunk, int32_t vocab) {
        std::vector<float> logits(vocab);
        for (size_t i = 0; i < tokens.size(); i += chunk) {
            size_t n = std::min(chunk, tokens.size() - i);
            SeqStep step{std::span<const int32_t>(tokens.data() + i, n), cached, blocks, i + n == tokens.size()};
            backend.forward(*pool, std::span<const SeqStep>(&step, 1), logits.data());
            cached += static_cast<int32_t>(n);
        }
        return logits;
    }
};

struct Layout {
    int32_t tp, ep;
};

void expect_same_as_one_rank(const std::string &dir, Layout layout) {
    SCOPED_TRACE(dir + " tp " + std::to_string(layout.tp) + " ep " + std::to_string(layout.ep));
    auto ckpt = Checkpoint::open(dir);
    const int32_t vocab = ckpt->config().vocab_size;
    BackendOptions options;
    options.n_threads = 2;
    auto one = make_cpu_backend(*ckpt, options);
    auto sharded = make_sharded_cpu_backend(*ckpt, options, layout.tp, layout.ep);
    for (const RefCase &c : load_ref_cases(dir)) {
        const int32_t max_len = static_cast<int32_t>(c.prompt.size() + kGreedySteps);
        SeqRun a(*one, max_len), b(*sharded, max_len);
        // The sharded run prefills in chunks of 7: its KV cache is read back across steps.
        std::vector<float> la = a.feed(c.prompt, c.prompt.size(), vocab), lb = b.feed(c.prompt, 7, vocab);
        bool binding = true;
        for (size_t step = 0; step < std::min(kGreedySteps, c.greedy.size()); ++step) {
            SCOPED_TRACE("prompt of " + std::to_string(c.prompt.size()) + ", greedy step " + std::to_string(step));
            EXPECT_LE(max_abs_diff(la, lb), kShardTolerance);
            const int32_t next = argmax(la);
            ASSERT_EQ(argmax(lb), next);
            // The reference's ids bind up to its first near-tie; one rank's argmax is followed after it.
            binding = binding && c.margins[step] > kMarginFloor;
            if (binding) {
                EXPECT_EQ(next, c.greedy[step]);
            }
            la = a.feed({next}, 1, vocab);
            lb = b.feed({next}, 1, vocab);
        }
    }
}

TEST(DistShardedBackend, TensorParallelMatchesOneRank) {
    for (const char *dir : kFixtures)
        for (int32_t tp : {2, 4}) expect_same_as_one_rank(dir, {tp, 1});
    // 3 ranks over 2 heads and a 512 vocabulary: an idle attention rank and padded vocab slices.
    expect_same_as_one_rank(kFixtures[0], {3, 1});
}

TEST(DistShardedBackend, ExpertParallelMatchesOneRank) {
    for (const char *dir : kFixtures)
        for (int32_t ep : {2, 4}) expect_same_as_one_rank(dir, {1, ep});
    expect_same_as_one_rank(kFixtures[1], {2, 2});
}

TEST(DistShardedBackend, BatchedSequencesGatherTheirOwnRows) {
    auto ckpt = Checkpoint::open(kFixtures[1]);
    const int32_t vocab = ckpt->config().vocab_size;
    auto cases = load_ref_cases(kFixtures[1]);
    ASSERT_GE(cases.size(), 2u);
    BackendOptions options;
    options.n_threads = 2;
    auto one = make_cpu_backend(*ckpt, options);
    auto sharded = make_sharded_cpu_backend(*ckpt, options, 2, 2);
    // Expected: each prompt alone on the one-rank backend.
    std::vector<std::vector<float>> expected;
    for (int i = 0; i < 2; ++i) {
        SeqRun r(*one, static_cast<int32_t>(cases[i].prompt.size()));
        expected.push_back(r.feed(cases[i].prompt, cases[i].prompt.size(), vocab));
    }
    // Both prompts in one step, plus a middle sequence that wants no logits.
    const int32_t len = static_cast<int32_t>(std::max(cases[0].prompt.size(), cases[1].prompt.size()));
    const int32_t per_seq = (len + kBlockSize - 1) / kBlockSize;
    auto pool = sharded->create_kv_pool(3 * per_seq, kBlockSize);
    std::vector<std::vector<int32_t>> tables(3);
    for (int s = 0; s < 3; ++s) {
        tables[s].resize(per_seq);
        std::iota(tables[s].begin(), tables[s].end(), s * per_seq);
    }
    std::vector<SeqStep> batch = {{cases[0].prompt, 0, tables[0], true},
                                  {cases[1].prompt, 0, tables[1], false},
                                  {cases[1].prompt, 0, tables[2], true}};
    std::vector<float> logits(2 * static_cast<size_t>(vocab));
    sharded->forward(*pool, batch, logits.data());
    std::vector<float> row0(logits.begin(), logits.begin() + vocab), row1(logits.begin() + vocab, logits.end());
    EXPECT_LE(max_abs_diff(row0, expected[0]), kShardTolerance);
    EXPECT_LE(max_abs_diff(row1, expected[1]), kShardTolerance);
}

// Runs one forward of the first case's prompt; returns the error it threw and how long it took.
struct Failure {
    dbrx_status status = DBRX_OK;
    std::string message;
    std::chrono::milliseconds elapsed{0};
};

Failure forward_once(Backend &backend, const std::vector<int32_t> &prompt, int32_t vocab) {
    SeqRun run(backend, static_cast<int32_t>(prompt.size()));
    Failure f;
    const auto start = std::chrono::steady_clock::now();
    try {
        run.feed(prompt, prompt.size(), vocab);
    } catch (const Error &e) {
        f.status = e.status();
        f.message = e.what();
    }
    f.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    return f;
}

TEST(DistShardedBackend, RankThatThrowsFailsTheStepAndTheBackend) {
    auto ckpt = Checkpoint::open(kFixtures[0]);
    const auto prompt = load_ref_cases(kFixtures[0])[0].prompt;
    ShardedCpuOptions so;
    so.timeout = 30s;  // the abort, not the timeout, must end the step
    int calls = 0;
    so.before_layer = [&](int32_t rank, int32_t layer) {
        if (rank == 2 && layer == 1 && ++calls == 2) throw std::runtime_error("injected fault");
    };
    auto be = make_sharded_cpu_backend(*ckpt, BackendOptions{}, 4, 1, so);
    Failure ok = forward_once(*be, prompt, ckpt->config().vocab_size);
    EXPECT_EQ(ok.status, DBRX_OK) << ok.message;
    Failure f = forward_once(*be, prompt, ckpt->config().vocab_size);
    EXPECT_EQ(f.status, DBRX_ERR_ENGINE_DEAD);
    EXPECT_NE(f.message.find("rank 2: injected fault"), std::string::npos) << f.message;
    EXPECT_LT(f.elapsed, 5s);
    Failure later = forward_once(*be, prompt, ckpt->config().vocab_size);
    EXPECT_EQ(later.status, DBRX_ERR_ENGINE_DEAD);
    EXPECT_NE(later.message.find("failed earlier"), std::string::npos) << later.message;
}

TEST(DistShardedBackend, StalledRankTimesOutTheOthers) {
    auto ckpt = Checkpoint::open(kFixtures[1]);
    const auto prompt = load_ref_cases(kFixtures[1])[0].prompt;
    ShardedCpuOptions so;
    so.timeout = 1s;
    so.before_layer = [](int32_t rank, int32_t layer) {
        if (rank == 1 && layer == 1) std::this_thread::sleep_for(2500ms);
    };
    auto be = make_sharded_cpu_backend(*ckpt, BackendOptions{}, 1, 2, so);
    Failure f = forward_once(*be, prompt, ckpt->config().vocab_size);
    EXPECT_EQ(f.status, DBRX_ERR_ENGINE_DEAD);
    EXPECT_NE(f.message.find("waiting for rank(s) 1"), std::string::npos) << f.message;
    // The step ends once the stalled thread returns (2.5 s); the others had given up at 1 s.
    EXPECT_LT(f.elapsed, 4s);
}

// Unique to each thread ever started, unlike std::thread::id, which a new thread may reuse.
uint64_t thread_serial() {
    static std::atomic<uint64_t> next{1};
    thread_local const uint64_t mine = next++;
    return mine;
}

TEST(DistShardedBackend, EachRankKeepsItsThreadAcrossSteps) {
    auto ckpt = Checkpoint::open(kFixtures[1]);
    const auto prompt = load_ref_cases(kFixtures[1])[0].prompt;
    constexpr int32_t kRanks = 4;
    std::mutex mutex;
    std::vector<std::set<uint64_t>> threads(kRanks);
    ShardedCpuOptions so;
    so.before_layer = [&](int32_t rank, int32_t) {
        std::lock_guard<std::mutex> lock(mutex);
        threads[rank].insert(thread_serial());
    };
    BackendOptions options;
    options.n_threads = kRanks;
    auto be = make_sharded_cpu_backend(*ckpt, options, 2, 2, so);
    for (int i = 0; i < 3; ++i) {
        Failure f = forward_once(*be, prompt, ckpt->config().vocab_size);
        ASSERT_EQ(f.status, DBRX_OK) << f.message;
    }
    std::set<uint64_t> all;
    for (int32_t r = 0; r < kRanks; ++r) {
        ASSERT_EQ(threads[r].size(), 1u) << "rank " << r << " ran on " << threads[r].size() << " threads";
        all.insert(*threads[r].begin());
    }
    EXPECT_EQ(*threads[0].begin(), thread_serial());
    EXPECT_EQ(all.size(), static_cast<size_t>(kRanks));
}

TEST(DistShardedBackend, RejectsLayoutsTheModelCannotTake) {
    auto ckpt = Checkpoint::open(kFixtures[1]);  // ffn 64, 16 experts, 2 heads
    try {
        make_sharded_cpu_backend(*ckpt, BackendOptions{}, 3, 1);
        ADD_FAILURE() << "tp 3 accepted";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(e.what()).find("ffn_hidden_size 64"), std::string::npos) << e.what();
    }
    EXPECT_THROW(make_sharded_cpu_backend(*ckpt, BackendOptions{}, 1, 3), Error);
    BackendOptions plain;
    EXPECT_EQ(make_parallel_cpu_backend(*ckpt, plain)->name(), "cpu");
    plain.tp = 2;
    EXPECT_EQ(make_parallel_cpu_backend(*ckpt, plain)->name(), "cpu-sharded(tp 2, ep 1)");
}

}  // namespace
}  // namespace dbrx::dist
