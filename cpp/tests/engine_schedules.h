// The engine's schedule-invariance checks over the reference fixtures, through the C API, for any
// backend: each case's greedy ids and last-prompt logits must not depend on how the cases are
// scheduled (one at a time, all at once, repeated so the prefix cache serves them, squeezed into a
// pool so small that requests are preempted and prefilled in small chunks), must match the float64
// reference, and seeded sampling must be the same alone and in a batch. Used by the CPU suite
// (test_engine_fixtures.cpp) and the CUDA suite (cuda/test_cuda_engine.cpp).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "reference_fixture.h"
#include "test_engine_harness.h"

namespace dbrx::testing {

struct ScheduleTolerances {
    float same = 1e-5f;         // max |logit difference| between schedules of one engine
    float ref = 2e-3f;          // max |last logit - float64 reference|
    double margin_floor = 1e-2;  // greedy ids must equal the reference until the first smaller margin
};

struct FixtureCase {
    std::vector<int32_t> prompt, greedy;
    std::vector<double> margins;
    std::vector<float> last_logits;
};

struct FixtureData {
    std::vector<FixtureCase> cases;
    ModelPtr model;
    int32_t vocab = 0;
};

inline FixtureData load_fixture(const std::string &dir, const dbrx_model_params &mp) {
    FixtureData f;
    const std::vector<RefCase> cases = load_ref_cases(dir);
    SafetensorsFile ref(dir + "/reference.safetensors");
    for (size_t i = 0; i < cases.size(); ++i) {
        FixtureCase k{cases[i].prompt, cases[i].greedy, cases[i].margins,
                      ref_tensor(ref, "case" + std::to_string(i) + ".last_logits")};
        EXPECT_FALSE(k.last_logits.empty()) << "no reference logits for case " << i;
        f.cases.push_back(std::move(k));
    }
    dbrx_model *m = nullptr;
    EXPECT_EQ(dbrx_model_load(dir.c_str(), &mp, &m), DBRX_OK) << dbrx_last_error();
    f.model.reset(m);
    dbrx_model_info info{};
    if (m) EXPECT_EQ(dbrx_model_get_info(m, &info), DBRX_OK);
    f.vocab = info.n_vocab;
    return f;
}

inline float max_abs_diff(const std::vector<float> &a, const std::vector<float> &b) {
    if (a.size() != b.size()) return INFINITY;
    float d = 0;
    for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
    return d;
}

// Greedy continuations of every case under four schedules; returns the worst logit difference seen
// between schedules (for reports).
inline float expect_same_results_under_every_schedule(const std::string &dir, const dbrx_model_params &mp,
                                                      const ScheduleTolerances &tol) {
    FixtureData f = load_fixture(dir, mp);
    EXPECT_NE(f.model, nullptr);
    if (!f.model) return INFINITY;
    std::vector<std::vector<int32_t>> prompts;
    std::vector<dbrx_sampling_params> sampling;
    int32_t worst = 0;
    for (const FixtureCase &c : f.cases) {
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

    for (size_t i = 0; i < f.cases.size(); ++i) {
        SCOPED_TRACE("case " + std::to_string(i));
        const FixtureCase &c = f.cases[i];
        EXPECT_EQ(alone[i].finish, DBRX_FINISH_LENGTH) << alone[i].error;
        EXPECT_LE(max_abs_diff(alone[i].prompt_logits, c.last_logits), tol.ref);
        for (size_t t = 0; t < c.greedy.size() && t < alone[i].ids.size(); ++t) {
            if (c.margins[t] < tol.margin_floor) break;  // near-ties may go either way from here on
            EXPECT_EQ(alone[i].ids[t], c.greedy[t]) << "step " << t;
            if (alone[i].ids[t] != c.greedy[t]) break;
        }
    }

    float seen = 0;
    auto expect_same = [&](const std::vector<Outcome> &got, const char *how) {
        for (size_t i = 0; i < f.cases.size(); ++i) {
            SCOPED_TRACE(std::string(how) + ", case " + std::to_string(i));
            EXPECT_EQ(got[i].finish, DBRX_FINISH_LENGTH) << got[i].error;
            EXPECT_EQ(got[i].ids, alone[i].ids);
            const float d = max_abs_diff(got[i].prompt_logits, alone[i].prompt_logits);
            EXPECT_LE(d, tol.same);
            seen = std::max(seen, d);
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
    return seen;
}

// Seeded temperature sampling gives the same ids alone and in a batch, and other seeds other ids.
inline void expect_seeded_sampling_batch_independent(const std::string &dir, const dbrx_model_params &mp) {
    FixtureData f = load_fixture(dir, mp);
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

}  // namespace dbrx::testing
