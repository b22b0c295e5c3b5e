// Sampling from a summary of the row (what a device backend returns from forward_summarized) must
// give exactly sample()'s token and numbers whenever the sampler accepts the summary: thousands of
// random rows (ties, near-ties that temperature merges, -inf, NaN, +inf) under random parameters.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "engine/logits_summary.h"
#include "engine/sampler.h"
#include "util/error.h"

namespace dbrx {
namespace {

enum class RowKind { Gaussian, Ties, NearTies, NegInf, Peaked, Special, kCount };

std::vector<float> random_row(RowKind kind, int32_t vocab, std::mt19937_64 &rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    const float scale = 0.5f + 6.0f * unit(rng);
    std::vector<float> row(static_cast<size_t>(vocab));
    for (float &l : row) l = scale * normal(rng);
    switch (kind) {
        case RowKind::Ties:  // few distinct values: long runs of equal logits
            for (float &l : row) l = std::round(l * 2.0f) / 2.0f;
            break;
        case RowKind::NearTies: {  // neighbouring floats, which 1/T may round together
            const float base = 1.0f + unit(rng);
            for (float &l : row) {
                l = base;
                for (int k = static_cast<int>(rng() % 6); k > 0; --k) l = std::nextafter(l, 10.0f);
                if (rng() % 4 == 0) l -= 1.0f + unit(rng);
            }
            break;
        }
        case RowKind::NegInf:  // masked tokens; sometimes nearly all of them
            for (float &l : row)
                if (unit(rng) < (rng() % 3 == 0 ? 0.995f : 0.3f)) l = -std::numeric_limits<float>::infinity();
            break;
        case RowKind::Peaked:  // a few tokens far above the rest
            for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) row[rng() % row.size()] += 8.0f + 4.0f * unit(rng);
            break;
        case RowKind::Special: {
            const float specials[] = {std::nanf(""), std::numeric_limits<float>::infinity(),
                                      -std::numeric_limits<float>::infinity(), -0.0f};
            for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k) row[rng() % row.size()] = specials[rng() % 4];
            break;
        }
        default:
            break;
    }
    return row;
}

dbrx_sampling_params random_params(std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    dbrx_sampling_params p = dbrx_sampling_default_params();
    p.n_stop_ids = 0;
    p.temperature = rng() % 4 == 0 ? 0.0f : 0.05f + 2.0f * unit(rng);
    const int k = static_cast<int>(rng() % 3);
    p.top_k = k == 0 ? 0 : (k == 1 ? 1 + static_cast<int32_t>(rng() % 40) : 1 + static_cast<int32_t>(rng() % 100));
    if (rng() % 2) p.top_p = std::max(0.01f, unit(rng) * (rng() % 2 ? 1.0f : 0.3f));
    if (rng() % 3 == 0) p.min_p = rng() % 2 ? unit(rng) : 0.5f + 0.5f * unit(rng);
    p.logprobs = rng() % 2;
    p.top_logprobs = rng() % 2 ? static_cast<int32_t>(rng() % (DBRX_MAX_TOP_LOGPROBS + 1)) : 0;
    if (rng() % 10 == 0) p.repetition_penalty = 1.3f;
    return p;
}

void expect_same_token(const dbrx_token &want, const dbrx_token &got) {
    EXPECT_EQ(got.id, want.id);
    EXPECT_EQ(std::memcmp(&got.logprob, &want.logprob, sizeof(float)), 0) << got.logprob << " vs " << want.logprob;
    ASSERT_EQ(got.n_top, want.n_top);
    for (int32_t i = 0; i < want.n_top; ++i) {
        EXPECT_EQ(got.top_ids[i], want.top_ids[i]) << i;
        EXPECT_EQ(std::memcmp(&got.top_logprobs[i], &want.top_logprobs[i], sizeof(float)), 0) << i;
    }
}

struct Tally {
    int accepted = 0, total = 0;
};

// The summary as a device would return it: sums rounded in another order, a relative 1e-11 away.
void perturb_sums(LogitsSummary &s, std::mt19937_64 &rng) {
    std::uniform_real_distribution<double> e(-1e-11, 1e-11);
    s.sum_exp *= 1 + e(rng);
    s.sum_exp_t *= 1 + e(rng);
}

TEST(SamplerSummary, SameTokenAndLogprobsAsTheFullRowWheneverAccepted) {
    std::mt19937_64 rng(20261129);
    LogitsSummarizer summarizer;
    Sampler full, from_summary;
    Tally greedy, top_k, nucleus, any;
    const int32_t vocabs[] = {1, 7, 64, 65, 300, 4096};
    for (int iter = 0; iter < 6000; ++iter) {
        const auto kind = static_cast<RowKind>(iter % static_cast<int>(RowKind::kCount));
        const int32_t vocab = vocabs[rng() % std::size(vocabs)];
        const std::vector<float> row = random_row(kind, vocab, rng);
        const dbrx_sampling_params p = random_params(rng);
        const uint64_t seed = rng();
        const std::vector<int32_t> output(rng() % 50, 3 % vocab);
        SCOPED_TRACE("iteration " + std::to_string(iter) + " kind " + std::to_string(static_cast<int>(kind)) +
                     " vocab " + std::to_string(vocab) + " T " + std::to_string(p.temperature) + " top_k " +
                     std::to_string(p.top_k) + " top_p " + std::to_string(p.top_p) + " min_p " + std::to_string(p.min_p));
        LogitsSummary s;
        summarizer.summarize(row, logits_need(p), s);
        if (iter % 2) perturb_sums(s, rng);
        const std::optional<dbrx_token> got = from_summary.sample_summary(s, vocab, p, seed, output.size());
        std::optional<dbrx_token> want;
        try {
            want = full.sample(row, p, seed, {}, output);
        } catch (const Error &) {
            EXPECT_FALSE(got.has_value()) << "the full row has no finite logit, yet the summary gave a token";
            continue;
        }
        ++any.total;
        // Rows without long runs of (near-)equal logits at the top, nor NaN / +inf, nor penalties.
        const bool plain = (kind == RowKind::Gaussian || kind == RowKind::Peaked || kind == RowKind::NegInf) &&
                           p.repetition_penalty == 1.0f;
        Tally &t = p.temperature == 0 ? greedy : (p.top_k > 0 && p.top_k < 50 ? top_k : nucleus);
        if (plain) ++t.total;
        if (!got) continue;
        ++any.accepted;
        if (plain) ++t.accepted;
        if (iter % 2 == 0) {
            expect_same_token(*want, *got);
        } else {  // the draw is still exact; log-probabilities move by the sums' rounding only
            EXPECT_EQ(got->id, want->id);
            EXPECT_NEAR(got->logprob, want->logprob, 1e-6 * std::max(1.0f, std::fabs(want->logprob)));
        }
        if (::testing::Test::HasFailure()) return;
    }
    std::printf("accepted: greedy %d/%d, top_k < 50 %d/%d, other draws %d/%d, all %d/%d\n", greedy.accepted,
                greedy.total, top_k.accepted, top_k.total, nucleus.accepted, nucleus.total, any.accepted, any.total);
    // Plain greedy always; top-k below the candidate count nearly always (ties at the boundary and
    // NaN/+inf rows aside); the rest only when provable.
    EXPECT_EQ(greedy.accepted, greedy.total);
    EXPECT_GT(top_k.accepted, top_k.total * 9 / 10);
    EXPECT_GT(nucleus.accepted, 0);
}

TEST(SamplerSummary, FullVocabularyRowsAtDbrxSize) {
    std::mt19937_64 rng(7);
    LogitsSummarizer summarizer;
    Sampler full, from_summary;
    int accepted = 0;
    for (int iter = 0; iter < 40; ++iter) {
        std::vector<float> row = random_row(iter % 2 ? RowKind::Peaked : RowKind::Gaussian, 100352, rng);
        dbrx_sampling_params p = dbrx_sampling_default_params();
        p.n_stop_ids = 0;
        p.logprobs = true;
        p.top_logprobs = 5;
        p.temperature = iter % 4 == 0 ? 0.0f : 0.7f;
        if (iter % 4 == 1) p.top_k = 40;
        if (iter % 4 == 2) p.top_p = 0.9f;
        if (iter % 4 == 3) p.min_p = 0.1f;
        LogitsSummary s;
        summarizer.summarize(row, logits_need(p), s);
        const std::optional<dbrx_token> got = from_summary.sample_summary(s, 100352, p, 99 + iter, iter);
        if (!got) continue;
        ++accepted;
        expect_same_token(full.sample(row, p, 99 + iter, {}, std::vector<int32_t>(static_cast<size_t>(iter), 0)), *got);
    }
    EXPECT_GE(accepted, 20);  // greedy and top-k rows at least
}

// The host's share of a step per row at DBRX's vocabulary: sampling from the full row (what the
// engine did for every row) against sampling from its summary (what is left once the device reduces).
TEST(SamplerSummary, HostCostPerRowAtDbrxVocabulary) {
    std::mt19937_64 rng(11);
    const std::vector<float> row = random_row(RowKind::Gaussian, 100352, rng);
    LogitsSummarizer summarizer;
    Sampler sampler;
    dbrx_sampling_params greedy = dbrx_sampling_default_params();
    greedy.n_stop_ids = 0;
    greedy.logprobs = true;
    greedy.top_logprobs = 5;
    dbrx_sampling_params top_k = greedy;
    top_k.temperature = 0.8f;
    top_k.top_k = 40;
    for (const auto &[name, p] : {std::pair{"greedy + logprobs", greedy}, std::pair{"T 0.8, top_k 40 + logprobs", top_k}}) {
        LogitsSummary s;
        summarizer.summarize(row, logits_need(p), s);
        constexpr int kReps = 20;
        auto t0 = std::chrono::steady_clock::now();
        int32_t sink = 0;
        for (int i = 0; i < kReps; ++i) sink += sampler.sample(row, p, 1, {}, {}).id;
        auto t1 = std::chrono::steady_clock::now();
        for (int i = 0; i < kReps * 100; ++i) sink -= sampler.sample_summary(s, 100352, p, 1, 0).value().id;
        auto t2 = std::chrono::steady_clock::now();
        const double full_us = std::chrono::duration<double, std::micro>(t1 - t0).count() / kReps;
        const double summary_us = std::chrono::duration<double, std::micro>(t2 - t1).count() / (kReps * 100);
        std::printf("[SamplerSummary] %-28s full row %8.1f us, summary %6.2f us per row\n", name, full_us, summary_us);
        EXPECT_EQ(sink, -99 * kReps * sampler.sample(row, p, 1, {}, {}).id);
        EXPECT_LT(summary_us * 10, full_us);
    }
}

TEST(SamplerSummary, TopPCutProvenFromTheBoundOnTheTail) {
    // One dominant token, then 999 small ones: top_p 0.5 keeps the dominant one alone and the sum of
    // the tail (never listed) only has to be bounded.
    std::vector<float> row(1000, -5.0f);
    for (size_t i = 0; i < row.size(); ++i) row[i] -= 1e-3f * static_cast<float>(i);
    row[417] = 4.0f;
    dbrx_sampling_params p = dbrx_sampling_default_params();
    p.n_stop_ids = 0;
    p.temperature = 1.0f;
    p.top_p = 0.5f;
    LogitsSummarizer summarizer;
    LogitsSummary s;
    summarizer.summarize(row, logits_need(p), s);
    Sampler sampler;
    for (uint64_t seed = 0; seed < 20; ++seed) {
        const std::optional<dbrx_token> got = sampler.sample_summary(s, 1000, p, seed, 0);
        ASSERT_TRUE(got.has_value());
        EXPECT_EQ(got->id, 417);
    }
    // A tail whose weight puts the target within the sums' slack of a step cannot be proven: here
    // the listed prefix reaches 1 and the target is 0.5 * 2 = 1 give or take the slack.
    s.sum_exp_t = 2.0;
    EXPECT_FALSE(sampler.sample_summary(s, 1000, p, 0, 0).has_value());
    s.sum_exp_t = 1.9;  // clearly below: the dominant token alone again
    EXPECT_EQ(sampler.sample_summary(s, 1000, p, 0, 0).value().id, 417);
}

}  // namespace
}  // namespace dbrx
