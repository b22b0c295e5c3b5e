// The engine on the real CPU backend and both reference fixtures, through the C API: each case's
// greedy ids and last-prompt logits must not depend on how the cases are scheduled (one at a time,
// all at once, squeezed into a pool so small that requests are preempted, repeated so the prefix
// cache serves them), and must match the float64 reference within the CPU tolerances.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "reference_fixture.h"
#include "test_engine_harness.h"

namespace dbrx::testing {
namespace {

constexpr float kSameTolerance = 1e-5f;  // between schedules of the same engine
constexpr float kRefTolerance = 2e-3f;   // CPU fp32 against the float64 reference
constexpr double kMarginFloor = 1e-2;

struct Case {
    std::vector<int32_t> prompt, greedy;
    std::vector<double> margins;
    std::vector<float> last_logits;
};

struct FixtureData {
    std::vector<Case> cases;
    ModelPtr model;
    int32_t vocab = 0;
};

FixtureData load(const std::string &dir) {
    FixtureData f;
    const std::vector<RefCase> cases = load_ref_cases(dir);
    SafetensorsFile ref(dir + "/reference.safetensors");
    for (size_t i = 0; i < cases.size(); ++i) {
        Case k{cases[i].prompt, cases[i].greedy, cases[i].margins,
               ref_tensor(ref, "case" + std::to_string(i) + ".last_logits")};
        EXPECT_FALSE(k.last_logits.empty()) << "no reference logits for case " << i;
        f.cases.push_back(std::move(k));
    }
    dbrx_model_params mp = dbrx_model_default_params();
    mp.n_threads = 2;
    dbrx_model *m = nullptr;
    EXPECT_EQ(dbrx_model_load(dir.c_str(), &mp, &m), DBRX_OK) << dbrx_last_error();
    f.model.reset(m);
    dbrx_model_info info{};
    if (m) EXPECT_EQ(dbrx_model_get_info(m, &info), DBRX_OK);
    f.vocab = info.n_vocab;
    return f;
}

float max_diff(const std::vector<float> &a, const std::vector<float> &b) {
    if (a.size() != b.size()) return INFINITY;
    float d = 0;
    for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
    return d;
}

class EngineFixtures : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineFixtures, SameResultsUnderEverySchedule) {
    FixtureData f = load(std::string(DBRX_SOURCE_DIR) + GetParam());
    ASSERT_NE(f.model, nullptr);
    std::vector<std::vector<int32_t>> prompts;
    std::vector<dbrx_sampling_params> sampling;
    int32_t worst = 0;
    for (const Case &c : f.cases) {
        prompts.push_back(c.prompt);
        dbrx_sampling_params s = dbrx_sampling_default_params();
        s.max_tokens = static_cast<int32_t>(c.greedy.size());
        s.n_stop_ids = 0;  // compare whole continuations, eos or not
        s.keep_prompt_logits = true;
        sampling.push_back(s);
        worst = std::max<int32_t>(worst, static_cast<int32_t>(c.prompt.size() + c.greedy.size()) - 1);
    }

    dbrx_engine_params roomy = dbrx_engine_default_params();
    roomy.kv_blocks = 256;
    EnginePtr engine = make_engine(f.model.get(), roomy);
    auto alone = run_one_at_a_time(engine.get(), prompts, sampling, f.vocab);

    // Against the float64 reference.
    for (size_t i = 0; i < f.cases.size(); ++i) {
        SCOPED_TRACE("case " + std::to_string(i));
        const Case &c = f.cases[i];
        ASSERT_EQ(alone[i].finish, DBRX_FINISH_LENGTH) << alone[i].error;
        EXPECT_LE(max_diff(alone[i].prompt_logits, c.last_logits), kRefTolerance);
        for (size_t t = 0; t < c.greedy.size(); ++t) {
            ASSERT_EQ(alone[i].ids[t], c.greedy[t]) << "step " << t;
            if (c.margins[t] < kMarginFloor) break;  // ties within fp32 noise may go either way after this
        }
    }

    auto expect_same = [&](const std::vector<Outcome> &got, const char *how) {
        for (size_t i = 0; i < f.cases.size(); ++i) {
            SCOPED_TRACE(std::string(how) + ", case " + std::to_string(i));
            EXPECT_EQ(got[i].finish, DBRX_FINISH_LENGTH) << got[i].error;
            EXPECT_EQ(got[i].ids, alone[i].ids);
            EXPECT_LE(max_diff(got[i].prompt_logits, alone[i].prompt_logits), kSameTolerance);
        }
    };
    expect_same(run_together(engine.get(), prompts, sampling, f.vocab), "all at once");
    const dbrx_engine_stats before = stats_of(engine.get());
    expect_same(run_together(engine.get(), prompts, sampling, f.vocab), "repeated");
    const dbrx_engine_stats after = stats_of(engine.get());
    EXPECT_GT(after.prefix_hit_tokens, before.prefix_hit_tokens);

    // A pool that holds the largest request alone but never all of them; small chunks too.
    dbrx_engine_params tight = dbrx_engine_default_params();
    tight.kv_blocks = (worst + 15) / 16;
    tight.max_batch_tokens = 24;
    EnginePtr squeezed = make_engine(f.model.get(), tight);
    expect_same(run_together(squeezed.get(), prompts, sampling, f.vocab), "preempted");
    EXPECT_GT(stats_of(squeezed.get()).preemptions, 0);
}

TEST_P(EngineFixtures, SeededSamplingIsTheSameAloneAndInABatch) {
    FixtureData f = load(std::string(DBRX_SOURCE_DIR) + GetParam());
    ASSERT_NE(f.model, nullptr);
    std::vector<std::vector<int32_t>> prompts;
    std::vector<dbrx_sampling_params> sampling, reseeded;
    for (size_t i = 0; i < f.cases.size(); ++i) {
        prompts.push_back(f.cases[i].prompt);
        dbrx_sampling_params s = dbrx_sampling_default_params();
        s.temperature = 1.5f;  // the fixtures' logits are flat-ish; keep the draw wide
        s.max_tokens = 12;
        s.n_stop_ids = 0;
        s.has_seed = true;
        s.seed = 42 + i;
        sampling.push_back(s);
        s.seed = 4242 + i;
        reseeded.push_back(s);
    }
    dbrx_engine_params p = dbrx_engine_default_params();
    p.kv_blocks = 256;
    EnginePtr engine = make_engine(f.model.get(), p);
    auto alone = run_one_at_a_time(engine.get(), prompts, sampling, f.vocab);
    auto together = run_together(engine.get(), prompts, sampling, f.vocab);
    auto other = run_together(engine.get(), prompts, reseeded, f.vocab);
    int differing = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
        EXPECT_EQ(alone[i].ids, together[i].ids) << "case " << i;
        differing += other[i].ids != alone[i].ids;
    }
    EXPECT_EQ(differing, static_cast<int>(prompts.size()));
}

// tensor_parallel x expert_parallel ranks on the CPU: the engine sees one backend and must give
// the one-rank greedy ids (the sharded backend's own tests bound its logits).
TEST(EngineFixturesParallel, ShardedCpuModelServesTheSameGreedyIds) {
    const std::string dir = std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx";
    FixtureData f = load(dir);
    ASSERT_NE(f.model, nullptr);
    dbrx_model_params mp = dbrx_model_default_params();
    mp.n_threads = 2;
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
    for (const Case &c : f.cases) {
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
        EXPECT_LE(max_diff(a[i].prompt_logits, b[i].prompt_logits), kRefTolerance);
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
