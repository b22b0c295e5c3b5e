// The sampler alone: greedy ties, vLLM penalty semantics, the shape of the seeded draw under
// temperature / top-k / top-p / min-p, and log-probabilities.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "engine/sampler.h"
#include "util/error.h"

namespace dbrx {
namespace {

dbrx_sampling_params defaults() {
    dbrx_sampling_params p = dbrx_sampling_default_params();
    p.n_stop_ids = 0;
    return p;
}

std::vector<float> log_probs(std::vector<double> p) {
    std::vector<float> l;
    for (double x : p) l.push_back(static_cast<float>(std::log(x)));
    return l;
}

// Frequencies of each id over n draws (draw i uses index i, as the i-th generated token would).
std::vector<double> frequencies(const std::vector<float> &logits, const dbrx_sampling_params &p, int n) {
    Sampler s;
    std::vector<double> f(logits.size(), 0.0);
    std::vector<int32_t> output;
    for (int i = 0; i < n; ++i) {
        output.resize(static_cast<size_t>(i), 0);  // only its length matters without penalties
        f[static_cast<size_t>(s.sample(logits, p, 7, {}, output).id)] += 1.0 / n;
    }
    return f;
}

TEST(Sampler, GreedyTakesTheLowestIdAmongTiesAndSkipsNaN) {
    Sampler s;
    dbrx_sampling_params p = defaults();
    EXPECT_EQ(s.sample(std::vector<float>{1, 3, 3, 2}, p, 0, {}, {}).id, 1);
    EXPECT_EQ(s.sample(std::vector<float>{NAN, -1, NAN, -2}, p, 0, {}, {}).id, 1);
    EXPECT_THROW(s.sample(std::vector<float>{NAN, NAN}, p, 0, {}, {}), Error);
    p.temperature = 1;
    EXPECT_THROW(s.sample(std::vector<float>{NAN, -INFINITY}, p, 0, {}, {}), Error);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
    Sampler s;
    dbrx_sampling_params p = defaults();
    const std::vector<float> logits = {2.0f, 1.5f, -0.1f, -0.2f};
    EXPECT_EQ(s.sample(logits, p, 0, {}, {}).id, 0);
    p.repetition_penalty = 2.0f;
    const std::vector<int32_t> prompt = {0};
    EXPECT_EQ(s.sample(logits, p, 0, prompt, {}).id, 1);  // 2 / 2 = 1 < 1.5
    // Output tokens count too, and a negative logit moves further down: -0.1 * 2 < -0.15.
    const std::vector<float> negative = {-5.0f, -5.0f, -0.1f, -0.15f};
    const std::vector<int32_t> output = {2};
    EXPECT_EQ(s.sample(negative, p, 0, {}, output).id, 3);
    p.repetition_penalty = 1.0f;
    EXPECT_EQ(s.sample(negative, p, 0, {}, output).id, 2);
}

TEST(Sampler, FrequencyAndPresencePenaltiesCountOnlyOutputTokens) {
    Sampler s;
    dbrx_sampling_params p = defaults();
    const std::vector<float> logits = {3.0f, 1.4f, 0.0f};
    const std::vector<int32_t> prompt = {0, 0, 0};
    const std::vector<int32_t> output = {0, 0};
    p.frequency_penalty = 0.6f;
    p.presence_penalty = 0.5f;
    EXPECT_EQ(s.sample(logits, p, 0, prompt, {}).id, 0);      // prompt occurrences are not penalised
    EXPECT_EQ(s.sample(logits, p, 0, prompt, output).id, 1);  // 3 - 2 * 0.6 - 0.5 = 1.3 < 1.4
    p.frequency_penalty = 0.0f;
    EXPECT_EQ(s.sample(logits, p, 0, prompt, output).id, 0);  // 3 - 0.5 > 1.4
    p.presence_penalty = -1.0f;                               // negative penalties encourage repeats
    EXPECT_EQ(s.sample(std::vector<float>{1.0f, 1.5f}, p, 0, {}, std::vector<int32_t>{0}).id, 0);
}

TEST(Sampler, TemperatureDrawFollowsTheSoftmax) {
    const std::vector<float> logits = log_probs({0.1, 0.2, 0.3, 0.4});
    dbrx_sampling_params p = defaults();
    p.temperature = 1.0f;
    auto f = frequencies(logits, p, 40000);
    for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(f[i], 0.1 * (i + 1), 0.012) << i;
    p.temperature = 0.5f;  // p^2 renormalised: 1, 4, 9, 16 over 30
    f = frequencies(logits, p, 40000);
    for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(f[i], (i + 1.0) * (i + 1.0) / 30.0, 0.012) << i;
}

TEST(Sampler, TopKTopPAndMinPKeepTheRightTokens) {
    const std::vector<float> logits = log_probs({0.1, 0.2, 0.3, 0.4});
    dbrx_sampling_params p = defaults();
    p.temperature = 1.0f;
    p.top_k = 2;
    auto f = frequencies(logits, p, 30000);
    EXPECT_EQ(f[0] + f[1], 0.0);
    EXPECT_NEAR(f[3], 0.4 / 0.7, 0.015);
    p.top_k = 0;
    p.top_p = 0.5f;  // 0.4, then 0.3 reaches 0.7 >= 0.5
    f = frequencies(logits, p, 30000);
    EXPECT_EQ(f[0] + f[1], 0.0);
    EXPECT_NEAR(f[3], 0.4 / 0.7, 0.015);
    p.top_p = 0.35f;  // the top token alone reaches it
    f = frequencies(logits, p, 2000);
    EXPECT_NEAR(f[3], 1.0, 1e-9);
    p.top_p = 1.0f;
    p.min_p = 0.6f;  // keeps p >= 0.24
    f = frequencies(logits, p, 30000);
    EXPECT_EQ(f[0] + f[1], 0.0);
    EXPECT_NEAR(f[2], 0.3 / 0.7, 0.015);
    p.min_p = 1.0f;
    f = frequencies(logits, p, 2000);
    EXPECT_NEAR(f[3], 1.0, 1e-9);
    p.min_p = 0.0f;
    p.top_k = 1;
    f = frequencies(logits, p, 2000);
    EXPECT_NEAR(f[3], 1.0, 1e-9);
}

TEST(Sampler, DrawDependsOnlyOnSeedAndIndex) {
    EXPECT_EQ(counter_uniform(1, 5), counter_uniform(1, 5));
    EXPECT_NE(counter_uniform(1, 5), counter_uniform(2, 5));
    EXPECT_NE(counter_uniform(1, 5), counter_uniform(1, 6));
    std::vector<float> logits(50);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>(std::sin(i * 1.7));
    dbrx_sampling_params p = defaults();
    p.temperature = 1.0f;
    Sampler a, b;
    std::vector<int32_t> out_a, out_b;
    int differing = 0;
    for (int i = 0; i < 64; ++i) {
        int32_t x = a.sample(logits, p, 11, {}, out_a).id;
        EXPECT_EQ(x, Sampler().sample(logits, p, 11, {}, out_a).id);  // a fresh sampler agrees
        out_a.push_back(x);
        out_b.push_back(b.sample(logits, p, 12, {}, out_b).id);
        differing += out_a.back() != out_b.back();
    }
    EXPECT_GT(differing, 20);
}

TEST(Sampler, LogprobsAreRawLogSoftmax) {
    const std::vector<float> logits = log_probs({0.1, 0.2, 0.3, 0.4});
    dbrx_sampling_params p = defaults();
    p.logprobs = true;
    p.top_logprobs = 3;
    p.repetition_penalty = 3.0f;  // changes the choice, not the reported logprobs
    Sampler s;
    const std::vector<int32_t> prompt = {3};
    dbrx_token t = s.sample(logits, p, 0, prompt, {});
    EXPECT_EQ(t.id, 2);
    EXPECT_NEAR(t.logprob, std::log(0.3), 1e-6);
    ASSERT_EQ(t.n_top, 3);
    EXPECT_EQ(t.top_ids[0], 3);
    EXPECT_EQ(t.top_ids[1], 2);
    EXPECT_EQ(t.top_ids[2], 1);
    EXPECT_NEAR(t.top_logprobs[0], std::log(0.4), 1e-6);
    EXPECT_NEAR(t.top_logprobs[2], std::log(0.2), 1e-6);
    p.logprobs = false;
    p.top_logprobs = 0;
    t = s.sample(logits, p, 0, prompt, {});
    EXPECT_EQ(t.n_top, 0);
    EXPECT_EQ(t.logprob, 0.0f);
}

TEST(Sampler, ValidationNamesTheField) {
    dbrx_sampling_params p = dbrx_sampling_default_params();
    EXPECT_NO_THROW(validate_sampling(p, 10));
    p.n_stop_ids = 2;
    p.stop_ids[0] = 3;
    p.stop_ids[1] = 10;
    try {
        validate_sampling(p, 10);
        FAIL() << "stop id 10 accepted with a vocabulary of 10";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(e.what()).find("stop_ids[1]"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace dbrx
