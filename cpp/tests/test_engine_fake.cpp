// Scheduler, paging, prefix cache, preemption and sampling determinism on the fake backend: every
// batch shape must give each request exactly the logits of its token history.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "test_engine_fake_backend.h"
#include "test_engine_harness.h"

namespace dbrx::testing {
namespace {

constexpr int32_t kVocab = 64;
constexpr int32_t kCtx = 512;
constexpr int32_t kEos = 63;

std::vector<int32_t> make_prompt(int32_t len, uint64_t salt) { return hashed_prompt(len, salt, 7919, kVocab - 1); }

std::vector<std::vector<int32_t>> cases() {
    std::vector<std::vector<int32_t>> c;
    const int32_t lens[] = {1, 5, 15, 16, 17, 33, 70, 130};
    for (size_t i = 0; i < std::size(lens); ++i) c.push_back(make_prompt(lens[i], i + 1));
    return c;
}

dbrx_sampling_params greedy(int32_t max_tokens) {
    dbrx_sampling_params s = dbrx_sampling_default_params();
    s.max_tokens = max_tokens;
    s.n_stop_ids = 0;
    s.keep_prompt_logits = true;
    return s;
}

class EngineFake : public ::testing::Test {
protected:
    void SetUp() override { model_.reset(make_fake_model(kVocab, kCtx, {kEos}, &backend_)); }
    dbrx_engine_params params(int32_t kv_blocks, int32_t block_size = 16, int32_t max_batch_tokens = 2048) {
        dbrx_engine_params p = dbrx_engine_default_params();
        p.kv_blocks = kv_blocks;
        p.block_size = block_size;
        p.max_batch_tokens = max_batch_tokens;
        return p;
    }
    void expect_reference(const std::vector<std::vector<int32_t>> &prompts, const std::vector<Outcome> &got, int32_t n) {
        ASSERT_EQ(got.size(), prompts.size());
        for (size_t i = 0; i < prompts.size(); ++i) {
            SCOPED_TRACE("case " + std::to_string(i));
            EXPECT_EQ(got[i].finish, DBRX_FINISH_LENGTH) << got[i].error;
            EXPECT_EQ(got[i].ids, fake_reference_greedy(prompts[i], kVocab, n));
            EXPECT_EQ(got[i].prompt_logits, fake_reference_logits(prompts[i], kVocab));
        }
    }
    ModelPtr model_;
    FakeBackend *backend_ = nullptr;
};

TEST_F(EngineFake, GreedyMatchesReferenceOneAtATimeAndAllAtOnce) {
    auto prompts = cases();
    std::vector<dbrx_sampling_params> s(prompts.size(), greedy(12));
    EnginePtr e = make_engine(model_.get(), params(256));
    expect_reference(prompts, run_one_at_a_time(e.get(), prompts, s, kVocab), 12);
    expect_reference(prompts, run_together(e.get(), prompts, s, kVocab), 12);
}

TEST_F(EngineFake, ChunkedPrefillWithTinyBudgetAndBlocks) {
    auto prompts = cases();
    std::vector<dbrx_sampling_params> s(prompts.size(), greedy(9));
    for (int32_t budget : {1, 3, 7}) {
        for (int32_t bs : {1, 5}) {
            SCOPED_TRACE("budget " + std::to_string(budget) + " block_size " + std::to_string(bs));
            EnginePtr e = make_engine(model_.get(), params(4096 / bs, bs, budget));
            expect_reference(prompts, run_together(e.get(), prompts, s, kVocab), 9);
        }
    }
}

TEST_F(EngineFake, PreemptionRecomputesToTheSameOutput) {
    auto prompts = cases();
    std::vector<dbrx_sampling_params> s(prompts.size(), greedy(30));
    // 160 tokens of pool: the 130-token prompt + 30 tokens fits alone, never with the others.
    EnginePtr e = make_engine(model_.get(), params(10, 16, 64));
    expect_reference(prompts, run_together(e.get(), prompts, s, kVocab), 30);
    dbrx_engine_stats st = stats_of(e.get());
    EXPECT_GT(st.preemptions, 0);
    EXPECT_EQ(st.blocks_used, 0);
    EXPECT_EQ(st.running + st.waiting, 0);
}

TEST_F(EngineFake, PreemptionWithoutPrefixCache) {
    auto prompts = cases();
    std::vector<dbrx_sampling_params> s(prompts.size(), greedy(30));
    dbrx_engine_params p = params(10, 16, 64);
    p.enable_prefix_cache = false;
    EnginePtr e = make_engine(model_.get(), p);
    expect_reference(prompts, run_together(e.get(), prompts, s, kVocab), 30);
    dbrx_engine_stats st = stats_of(e.get());
    EXPECT_GT(st.preemptions, 0);
    EXPECT_EQ(st.prefix_hit_tokens, 0);
    EXPECT_EQ(st.blocks_cached, 0);
}

TEST_F(EngineFake, PrefixCacheHitsOnRepeatAndSharedPrefixes) {
    auto prompts = cases();
    std::vector<dbrx_sampling_params> s(prompts.size(), greedy(6));
    EnginePtr e = make_engine(model_.get(), params(256));
    expect_reference(prompts, run_one_at_a_time(e.get(), prompts, s, kVocab), 6);
    const dbrx_engine_stats first = stats_of(e.get());
    expect_reference(prompts, run_one_at_a_time(e.get(), prompts, s, kVocab), 6);
    const dbrx_engine_stats second = stats_of(e.get());
    // Every full prompt block but the one holding the last prompt token is reused: 16+16+32+64+128.
    EXPECT_EQ(second.prefix_hit_tokens - first.prefix_hit_tokens, 0 + 0 + 0 + 0 + 16 + 32 + 64 + 128);
    EXPECT_GT(second.prefix_query_tokens, first.prefix_query_tokens);
    EXPECT_EQ(second.prompt_tokens - first.prompt_tokens,
              (1 + 5 + 15 + 16 + 17 + 33 + 70 + 130) - (16 + 32 + 64 + 128));
    EXPECT_GT(second.blocks_cached, 0);
    EXPECT_EQ(second.blocks_used, 0);

    // A different continuation of a cached prefix shares the prefix and still computes its own tail.
    std::vector<int32_t> branch(prompts[7].begin(), prompts[7].begin() + 64);
    branch.push_back(3);
    branch.push_back(4);
    auto got = run_one_at_a_time(e.get(), {branch}, {greedy(5)}, kVocab);
    EXPECT_EQ(got[0].ids, fake_reference_greedy(branch, kVocab, 5));
    EXPECT_EQ(stats_of(e.get()).prefix_hit_tokens - second.prefix_hit_tokens, 64);
}

TEST_F(EngineFake, PrefixCacheEvictsWhenThePoolIsNeeded) {
    EnginePtr e = make_engine(model_.get(), params(12));
    for (uint64_t salt = 100; salt < 140; ++salt) {
        auto p = make_prompt(100, salt);
        auto got = run_one_at_a_time(e.get(), {p}, {greedy(4)}, kVocab);
        ASSERT_EQ(got[0].ids, fake_reference_greedy(p, kVocab, 4));
    }
    dbrx_engine_stats st = stats_of(e.get());
    EXPECT_EQ(st.blocks_used, 0);
    EXPECT_EQ(st.blocks_free + st.blocks_cached, 12);
}

dbrx_sampling_params seeded(uint64_t seed) {
    dbrx_sampling_params s = dbrx_sampling_default_params();
    s.temperature = 1.0f;
    s.top_p = 0.95f;
    s.top_k = 40;
    s.min_p = 0.01f;
    s.repetition_penalty = 1.1f;
    s.presence_penalty = 0.2f;
    s.frequency_penalty = 0.1f;
    s.max_tokens = 24;
    s.n_stop_ids = 0;
    s.has_seed = true;
    s.seed = seed;
    s.logprobs = true;
    s.top_logprobs = 3;
    return s;
}

TEST_F(EngineFake, SeededSamplingIsIndependentOfBatchAndPreemption) {
    auto prompts = cases();
    std::vector<dbrx_sampling_params> s;
    for (size_t i = 0; i < prompts.size(); ++i) s.push_back(seeded(1000 + i));
    EnginePtr roomy = make_engine(model_.get(), params(256));
    auto alone = run_one_at_a_time(roomy.get(), prompts, s, kVocab);
    auto together = run_together(roomy.get(), prompts, s, kVocab);
    EnginePtr tight = make_engine(model_.get(), params(12, 16, 32));
    auto squeezed = run_together(tight.get(), prompts, s, kVocab);
    EXPECT_GT(stats_of(tight.get()).preemptions, 0);
    for (size_t i = 0; i < prompts.size(); ++i) {
        SCOPED_TRACE("case " + std::to_string(i));
        EXPECT_EQ(alone[i].ids.size(), 24u);
        EXPECT_EQ(alone[i].ids, together[i].ids);
        EXPECT_EQ(alone[i].ids, squeezed[i].ids);
        for (size_t t = 0; t < alone[i].tokens.size(); ++t) {
            EXPECT_EQ(alone[i].tokens[t].logprob, squeezed[i].tokens[t].logprob);
            EXPECT_EQ(alone[i].tokens[t].n_top, 3);
            EXPECT_LE(alone[i].tokens[t].logprob, 0.0f);
        }
    }
    // The same prompt with other seeds gives other tokens.
    std::vector<dbrx_sampling_params> other(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) other[i] = seeded(5000 + i);
    auto differ = run_together(roomy.get(), prompts, other, kVocab);
    int n_different = 0;
    for (size_t i = 0; i < prompts.size(); ++i) n_different += differ[i].ids != alone[i].ids;
    EXPECT_EQ(n_different, static_cast<int>(prompts.size()));
}

TEST_F(EngineFake, UnseededRequestsDrawDifferentSeeds) {
    dbrx_sampling_params s = seeded(0);
    s.has_seed = false;
    EnginePtr e = make_engine(model_.get(), params(256));
    auto p = make_prompt(20, 9);
    auto got = run_together(e.get(), {p, p, p}, {s, s, s}, kVocab);
    EXPECT_FALSE(got[0].ids == got[1].ids && got[1].ids == got[2].ids);
}

TEST_F(EngineFake, StopsAtEosByDefaultAndAtCustomStopIds) {
    auto p = make_prompt(10, 3);
    auto expected = fake_reference_greedy(p, kVocab, 40);
    EnginePtr e = make_engine(model_.get(), params(256));
    // Custom stop id: the first token greedy produces that differs from the first one.
    dbrx_sampling_params s = greedy(40);
    s.n_stop_ids = 1;
    s.stop_ids[0] = expected[3];
    auto got = run_one_at_a_time(e.get(), {p}, {s}, kVocab);
    const auto stop_at = std::find(expected.begin(), expected.end(), expected[3]) - expected.begin();
    EXPECT_EQ(got[0].finish, DBRX_FINISH_STOP);
    EXPECT_EQ(got[0].ids, std::vector<int32_t>(expected.begin(), expected.begin() + stop_at + 1));
    // Default: the model's eos ids.
    std::vector<int32_t> eos_prompt;
    for (int32_t t = 0; t < 62 && eos_prompt.empty(); ++t) {
        auto cand = make_prompt(6, 400 + t);
        if (fake_reference_greedy(cand, kVocab, 1)[0] == kEos) eos_prompt = cand;
    }
    if (eos_prompt.empty()) {
        for (uint64_t salt = 1000; eos_prompt.empty(); ++salt) {
            auto cand = make_prompt(6, salt);
            if (fake_reference_greedy(cand, kVocab, 1)[0] == kEos) eos_prompt = cand;
        }
    }
    dbrx_sampling_params d = greedy(10);
    d.n_stop_ids = -1;
    got = run_one_at_a_time(e.get(), {eos_prompt}, {d}, kVocab);
    EXPECT_EQ(got[0].finish, DBRX_FINISH_STOP);
    EXPECT_EQ(got[0].ids, std::vector<int32_t>{kEos});
}

TEST_F(EngineFake, CancelFreesAllNonCachedBlocks) {
    backend_->step_delay_us = 1000;
    EnginePtr e = make_engine(model_.get(), params(64, 16, 8));
    const dbrx_engine_stats before = stats_of(e.get());
    auto p = make_prompt(100, 77);
    dbrx_sampling_params s = greedy(200);
    uint64_t id = submit_ok(e.get(), p, s);
    // Wait until it is decoding, holding blocks.
    dbrx_token tok[4];
    int32_t n = 0;
    dbrx_finish_reason f = DBRX_FINISH_NONE;
    ASSERT_EQ(dbrx_engine_poll(e.get(), id, 10000, tok, 1, &n, &f), DBRX_OK) << dbrx_last_error();
    EXPECT_GT(stats_of(e.get()).blocks_used, 0);
    ASSERT_EQ(dbrx_engine_cancel(e.get(), id), DBRX_OK);
    ASSERT_EQ(dbrx_engine_cancel(e.get(), id), DBRX_OK);  // idempotent
    Outcome rest = drain(e.get(), id, kVocab, false);
    EXPECT_EQ(rest.finish, DBRX_FINISH_CANCELLED);
    const dbrx_engine_stats after = stats_of(e.get());
    EXPECT_EQ(after.blocks_used, before.blocks_used);
    EXPECT_EQ(after.blocks_cached, 6);  // the 6 full prompt blocks stay as reusable prefix
    EXPECT_EQ(after.blocks_free + after.blocks_cached, after.blocks_total);
    EXPECT_EQ(after.running + after.waiting, 0);
    uint64_t gone = id;
    EXPECT_EQ(dbrx_engine_cancel(e.get(), gone), DBRX_ERR_NOT_FOUND);
}

TEST_F(EngineFake, CancelWhileWaitingAndReleaseWhileRunning) {
    backend_->step_delay_us = 1000;
    EnginePtr e = make_engine(model_.get(), params(20, 16, 4));
    auto p = make_prompt(200, 5);
    uint64_t a = submit_ok(e.get(), p, greedy(100));
    uint64_t b = submit_ok(e.get(), p, greedy(100));  // waits: a holds most of the pool
    ASSERT_EQ(dbrx_engine_cancel(e.get(), b), DBRX_OK);
    Outcome ob = drain(e.get(), b, kVocab, false);
    EXPECT_EQ(ob.finish, DBRX_FINISH_CANCELLED);
    EXPECT_TRUE(ob.ids.empty());
    EXPECT_EQ(stats_of(e.get()).running, 1);
    ASSERT_EQ(dbrx_engine_release(e.get(), a), DBRX_OK);
    for (int i = 0; i < 200 && stats_of(e.get()).blocks_used > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    dbrx_engine_stats st = stats_of(e.get());
    EXPECT_EQ(st.blocks_used, 0);
    EXPECT_EQ(st.running + st.waiting, 0);
}

TEST_F(EngineFake, PollTimesOutAndUnknownIdsAreNotFound) {
    EnginePtr e = make_engine(model_.get(), params(64));
    dbrx_token tok[1];
    int32_t n = -1;
    dbrx_finish_reason f = DBRX_FINISH_ERROR;
    EXPECT_EQ(dbrx_engine_poll(e.get(), 12345, 0, tok, 1, &n, &f), DBRX_ERR_NOT_FOUND);
    EXPECT_NE(std::string(dbrx_last_error()).find("12345"), std::string::npos);
    EXPECT_EQ(dbrx_engine_release(e.get(), 12345), DBRX_ERR_NOT_FOUND);
    // A long request polled with no wait right after submit has nothing yet or a few tokens.
    auto p = make_prompt(8, 1);
    uint64_t id = submit_ok(e.get(), p, greedy(300));
    dbrx_status st = dbrx_engine_poll(e.get(), id, 0, tok, 1, &n, &f);
    EXPECT_TRUE(st == DBRX_ERR_TIMEOUT || (st == DBRX_OK && n == 1));
    Outcome o = drain(e.get(), id, kVocab, false);
    EXPECT_EQ(o.ids.size() + (st == DBRX_OK ? 1u : 0u), 300u);
}

TEST_F(EngineFake, ForwardFailureFailsOnlyItsBatchAndTheEngineGoesOn) {
    backend_->fail_token = 62;
    EnginePtr e = make_engine(model_.get(), params(64));
    std::vector<int32_t> poison = {1, 2, 62, 3};
    uint64_t bad = submit_ok(e.get(), poison, greedy(5));
    Outcome ob = drain(e.get(), bad, kVocab, false);
    EXPECT_EQ(ob.finish, DBRX_FINISH_ERROR);
    EXPECT_NE(ob.error.find("injected failure"), std::string::npos) << ob.error;
    auto p = make_prompt(30, 8);
    std::replace(p.begin(), p.end(), 62, 61);
    auto good = run_one_at_a_time(e.get(), {p}, {greedy(5)}, kVocab);
    EXPECT_EQ(good[0].finish, DBRX_FINISH_LENGTH);
    EXPECT_EQ(stats_of(e.get()).blocks_used, 0);
}

TEST_F(EngineFake, LongPromptIsChunkedAndNeverStallsRunningDecodes) {
    backend_->log_batches = true;
    EnginePtr e = make_engine(model_.get(), params(64, 16, 8));
    auto short_prompt = make_prompt(4, 21);
    auto long_prompt = make_prompt(300, 22);
    backend_->step_delay_us = 100;  // the short request runs > 6 ms: the long one arrives meanwhile
    uint64_t r = submit_ok(e.get(), short_prompt, greedy(60));
    uint64_t l = submit_ok(e.get(), long_prompt, greedy(3));
    Outcome ol = drain(e.get(), l, kVocab, false);
    Outcome orr = drain(e.get(), r, kVocab, false);
    EXPECT_EQ(ol.ids, fake_reference_greedy(long_prompt, kVocab, 3));
    EXPECT_EQ(orr.ids, fake_reference_greedy(short_prompt, kVocab, 60));
    // The long prompt needs more than 40 steps of chunks (at most 8 - 1 tokens each) while the
    // short one decodes 60 tokens, one a step: every step with a chunk also carried that decode.
    int chunk_steps = 0;
    for (const auto &step : backend_->batch_log) {
        int32_t total = 0;
        bool chunk = false, decode = false;
        for (auto [pos0, n_new] : step) {
            total += n_new;
            chunk |= n_new > 1;
            decode |= n_new == 1 && pos0 >= 4 && pos0 < 4 + 60;
        }
        EXPECT_LE(total, 8);
        const bool short_prefill = std::find(step.begin(), step.end(), std::pair<int32_t, int32_t>{0, 4}) != step.end();
        if (!chunk || short_prefill) continue;
        ++chunk_steps;
        EXPECT_TRUE(decode) << "a prefill chunk stalled the running decode";
    }
    EXPECT_GE(chunk_steps, 300 / 8);
}

TEST_F(EngineFake, ManyCallerThreadsSubmitPollCancelAndRelease) {
    backend_->step_delay_us = 50;
    EnginePtr e = make_engine(model_.get(), params(24, 16, 64));  // small: preemption under load
    std::vector<std::thread> callers;
    std::atomic<int> wrong{0}, cancelled{0}, finished{0};
    for (int t = 0; t < 8; ++t) {
        callers.emplace_back([&, t] {
            for (int k = 0; k < 6; ++k) {
                auto p = make_prompt(5 + 13 * ((t + k) % 7), 1000 + 10 * t + k);
                uint64_t id = submit_ok(e.get(), p, greedy(20));
                if ((t + k) % 3 == 0) {
                    EXPECT_EQ(dbrx_engine_cancel(e.get(), id), DBRX_OK);
                    Outcome o = drain(e.get(), id, kVocab, false);
                    auto expected = fake_reference_greedy(p, kVocab, 20);
                    // Whatever was produced before the cancel is a correct prefix.
                    wrong += !std::equal(o.ids.begin(), o.ids.end(), expected.begin());
                    cancelled += o.finish == DBRX_FINISH_CANCELLED;
                    finished += o.finish == DBRX_FINISH_LENGTH;
                } else if ((t + k) % 3 == 1) {
                    EXPECT_EQ(dbrx_engine_release(e.get(), id), DBRX_OK);  // abandon it running
                } else {
                    Outcome o = drain(e.get(), id, kVocab, false);
                    wrong += o.ids != fake_reference_greedy(p, kVocab, 20);
                    finished += o.finish == DBRX_FINISH_LENGTH;
                }
            }
        });
    }
    for (auto &c : callers) c.join();
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_EQ(cancelled.load() + finished.load(), 8 * 6 - 16);
    for (int i = 0; i < 400; ++i) {
        dbrx_engine_stats st = stats_of(e.get());
        if (st.running + st.waiting == 0) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    dbrx_engine_stats st = stats_of(e.get());
    EXPECT_EQ(st.running + st.waiting, 0);
    EXPECT_EQ(st.blocks_used, 0);
}

TEST_F(EngineFake, DeviceLossStopsTheEngine) {
    backend_->fatal_token = 62;
    backend_->step_delay_us = 500;
    EnginePtr e = make_engine(model_.get(), params(64));
    auto p = make_prompt(10, 8);
    std::replace(p.begin(), p.end(), 62, 61);
    uint64_t victim = submit_ok(e.get(), p, greedy(400));
    dbrx_token tok[1];
    int32_t n = 0;
    dbrx_finish_reason f;
    ASSERT_EQ(dbrx_engine_poll(e.get(), victim, 10000, tok, 1, &n, &f), DBRX_OK);
    uint64_t fatal = submit_ok(e.get(), {1, 62}, greedy(3));
    Outcome of = drain(e.get(), fatal, kVocab, false);
    EXPECT_EQ(of.finish, DBRX_FINISH_ERROR);
    EXPECT_NE(of.error.find("device loss"), std::string::npos) << of.error;
    Outcome ov = drain(e.get(), victim, kVocab, false);
    EXPECT_EQ(ov.finish, DBRX_FINISH_ERROR);
    uint64_t id = 0;
    dbrx_sampling_params s = greedy(3);
    EXPECT_EQ(dbrx_engine_submit(e.get(), p.data(), static_cast<int32_t>(p.size()), &s, &id), DBRX_ERR_ENGINE_DEAD);
    EXPECT_NE(std::string(dbrx_last_error()).find("device loss"), std::string::npos);
    std::vector<int32_t> ids(4);
    int32_t n_ids = 0;
    EXPECT_EQ(dbrx_generate(e.get(), p.data(), static_cast<int32_t>(p.size()), &s, ids.data(), 4, &n_ids, nullptr, &f),
              DBRX_ERR_ENGINE_DEAD);
    EXPECT_EQ(dbrx_engine_get_stats(e.get(), nullptr), DBRX_ERR_INVALID_ARGUMENT);
    stats_of(e.get());
}

TEST_F(EngineFake, StatsCountStepsTokensAndRate) {
    EnginePtr e = make_engine(model_.get(), params(64));
    auto got = run_together(e.get(), {make_prompt(20, 1), make_prompt(3, 2)}, {greedy(10), greedy(10)}, kVocab);
    dbrx_engine_stats st = stats_of(e.get());
    EXPECT_EQ(st.generated_tokens, 20);
    EXPECT_EQ(st.finished_requests, 2);
    EXPECT_EQ(st.prompt_tokens, 23);
    EXPECT_EQ(st.prefix_query_tokens, 23);
    EXPECT_GE(st.steps, 10);
    EXPECT_GT(st.tokens_per_second, 0.0);
    EXPECT_EQ(st.block_size, 16);
    EXPECT_EQ(st.blocks_total, 64);
    EXPECT_EQ(st.kv_capacity_tokens, 64 * 16);
    EXPECT_EQ(st.blocks_cached, 1);  // the 20-token prompt's first block
    EXPECT_EQ(st.blocks_free, 63);
}

}  // namespace
}  // namespace dbrx::testing
