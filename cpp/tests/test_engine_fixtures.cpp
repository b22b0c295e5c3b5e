// The engine on the real CPU backend and both reference fixtures, through the C API: each case's
// greedy ids and last-prompt logits must not depend on how the cases are scheduled (one at a time,
// all at once, squeezed into a pool so small that requests are preempted, repeated so the prefix
// cache serves them), and must match the float64 reference within the CPU tolerances.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine_schedules.h"

namespace dbrx::testing {
namespace {

constexpr float kRefTolerance = 2e-3f;  // CPU fp32 against the float64 reference
constexpr double kMarginFloor = 1e-2;

dbrx_model_params cpu_params() {
    dbrx_model_params mp = dbrx_model_default_params();
    mp.n_threads = 2;
    return mp;
}

class EngineFixtures : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineFixtures, SameResultsUnderEverySchedule) {
    expect_same_results_under_every_schedule(std::string(DBRX_SOURCE_DIR) + GetParam(), cpu_params(),
                                             ScheduleTolerances{1e-5f, kRefTolerance, kMarginFloor});
}

TEST_P(EngineFixtures, SeededSamplingIsTheSameAloneAndInABatch) {
    expect_seeded_sampling_batch_independent(std::string(DBRX_SOURCE_DIR) + GetParam(), cpu_params());
}

// tensor_parallel x expert_parallel ranks on the CPU: the engine sees one backend and must give
// the one-rank greedy ids (the sharded backend's own tests bound its logits).
TEST(EngineFixturesParallel, ShardedCpuModelServesTheSameGreedyIds) {
    const std::string dir = std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx";
    FixtureData f = load_fixture(dir, cpu_params());
    ASSERT_NE(f.model, nullptr);
    dbrx_model_params mp = cpu_params();
    mp.tensor_parallel = 2;
    mp.expert_parallel = 2;
    dbrx_model *m = nullptr;
    ASSERT_EQ(dbrx_model_load(dir.c_str(), &mp, &m), DBRX_OK) << dbrx_last_error();
    ModelPtr sharded(m);
    dbrx_engine_params p = dbrx_engine_default_params();
    p.kv_blocks = 64;
    EnginePtr one = make_engine(f.model.get(), p);
    EnginePtr many = make_engine(sharded.get(), p);
    std::vector<std::vector<int32_t>> prompts;
    std::vector<dbrx_sampling_params> sampling;
    for (const FixtureCase &c : f.cases) {
        prompts.push_back(c.prompt);
        dbrx_sampling_params s = dbrx_sampling_default_params();
        s.max_tokens = 6;
        s.n_stop_ids = 0;
        s.keep_prompt_logits = true;
        sampling.push_back(s);
    }
    auto a = run_together(one.get(), prompts, sampling, f.vocab);
    auto b = run_together(many.get(), prompts, sampling, f.vocab);
    for (size_t i = 0; i < prompts.size(); ++i) {
        SCOPED_TRACE("case " + std::to_string(i));
        EXPECT_LE(max_abs_diff(a[i].prompt_logits, b[i].prompt_logits), kRefTolerance);
        for (size_t t = 0; t < a[i].ids.size(); ++t) {
            ASSERT_EQ(a[i].ids[t], b[i].ids[t]) << "step " << t;
            if (f.cases[i].margins[t] < kMarginFloor) break;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, EngineFixtures, ::testing::Values("/fixtures/tiny-dbrx", "/models/tiny-dbrx-cl100k"),
                         [](const auto &info) { return info.index == 0 ? std::string("tiny_dbrx") : std::string("tiny_dbrx_cl100k"); });

}  // namespace
}  // namespace dbrx::testing
