// Scheduler overhead: the engine's own cost per step (scheduling, block bookkeeping, sampling,
// hand-off to pollers) with a backend that does no work. Prints figures; asserts only correctness.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>

#include "test_engine_fake_backend.h"
#include "test_engine_harness.h"

namespace dbrx::testing {
namespace {

constexpr int32_t kVocab = 256;

struct BenchResult {
    double seconds;
    dbrx_engine_stats stats;
};

BenchResult run_bench(dbrx_model *model, int32_t kv_blocks, int32_t n_requests, int32_t prompt_len, int32_t max_tokens,
                      bool shared_prefix, float temperature) {
    dbrx_engine_params p = dbrx_engine_default_params();
    p.kv_blocks = kv_blocks;
    EnginePtr e = make_engine(model, p);
    dbrx_sampling_params s = dbrx_sampling_default_params();
    s.max_tokens = max_tokens;
    s.n_stop_ids = 0;
    s.temperature = temperature;
    s.has_seed = true;
    std::vector<std::vector<int32_t>> prompts;
    for (int32_t r = 0; r < n_requests; ++r) {
        std::vector<int32_t> prompt;
        for (int32_t i = 0; i < prompt_len; ++i)
            prompt.push_back(static_cast<int32_t>(splitmix64((shared_prefix ? 0 : r) * 131 + i) % kVocab));
        prompt.back() = r % kVocab;
        prompts.push_back(prompt);
    }
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<uint64_t> ids;
    for (int32_t r = 0; r < n_requests; ++r) {
        s.seed = static_cast<uint64_t>(r);
        ids.push_back(submit_ok(e.get(), prompts[r], s));
    }
    size_t total = 0;
    for (uint64_t id : ids) {
        Outcome o = drain(e.get(), id, kVocab, false);
        EXPECT_EQ(o.finish, DBRX_FINISH_LENGTH);
        total += o.ids.size();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(total, static_cast<size_t>(n_requests) * max_tokens);
    return {seconds, stats_of(e.get())};
}

void print(const char *name, const BenchResult &r) {
    std::printf("[EngineBench] %-34s steps %6lld  %.3f s  %8.0f steps/s  %9.0f tokens/s  %6.1f us/step  preemptions %lld  prefix hits %lld/%lld\n",
                name, static_cast<long long>(r.stats.steps), r.seconds, r.stats.steps / r.seconds,
                r.stats.generated_tokens / r.seconds, 1e6 * r.seconds / r.stats.steps,
                static_cast<long long>(r.stats.preemptions), static_cast<long long>(r.stats.prefix_hit_tokens),
                static_cast<long long>(r.stats.prefix_query_tokens));
}

TEST(EngineBench, SchedulerOverhead64TinyRequests) {
    ModelPtr model(make_fake_model(kVocab, 4096, {}));
    print("64 x (8 prompt + 64 greedy)", run_bench(model.get(), 1024, 64, 8, 64, false, 0.0f));
    print("64 x (8 prompt + 64 sampled)", run_bench(model.get(), 1024, 64, 8, 64, false, 0.8f));
    print("64 x (40 shared prompt + 64 greedy)", run_bench(model.get(), 1024, 64, 40, 64, true, 0.0f));
    BenchResult tight = run_bench(model.get(), 40, 64, 8, 64, false, 0.0f);
    print("64 x (8 + 64) in 40 blocks (preempt)", tight);
    EXPECT_GT(tight.stats.preemptions, 0);
}

}  // namespace
}  // namespace dbrx::testing
