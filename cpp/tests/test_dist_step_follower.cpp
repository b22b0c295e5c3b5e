// Multi-process serving without GPUs: LeaderBackend on one side of a real localhost TCP step channel,
// serve_follower on the other, both over recording backends (step_channel_test_util.h) or the
// engine's fake model, so the follower's steps can be compared with process 0's one by one; and the
// ways the group ends: shutdown, a leader that closes, falls silent or dies mid-step, a follower
// that fails or disappears. Every wait is bounded.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>

#include "api/handles.h"
#include "dist/step_follower.h"
#include "dist/step_leader.h"
#include "step_channel_test_util.h"
#include "test_engine_fake_backend.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;
using dbrx::testing::StepRecorder;
using Clock = std::chrono::steady_clock;

bool has(const std::string &text, const std::string &part) { return text.find(part) != std::string::npos; }

StepGroupOptions fast_options() {
    StepGroupOptions o;
    o.io_timeout = 5s;
    o.heartbeat = 50ms;
    o.idle_timeout = 5s;
    return o;
}

// One leader (over `lead`) and one follower (over `follow`, on its own thread).
struct Pair {
    StepRecorder *lead = nullptr;
    StepRecorder follow;
    testing::StepGroup group;
    std::unique_ptr<LeaderBackend> leader;
    std::future<FollowerStats> served;

    explicit Pair(StepGroupOptions options = fast_options(), bool start_follower = true) {
        group = testing::step_group(1);
        auto inner = std::make_unique<StepRecorder>();
        lead = inner.get();
        auto link = std::make_shared<LeaderLink>(std::move(group.leader_side), options);
        StepRecorder *l = lead;
        leader = std::make_unique<LeaderBackend>(std::move(inner), [l](const std::string &w) { l->abort(w); }, link);
        if (start_follower) serve(options);
    }
    // Shuts the group down first, so a follower still serving (a failed test) returns.
    ~Pair() { leader.reset(); }
    void serve(StepGroupOptions options) {
        served = std::async(std::launch::async, [this, options] {
            return serve_follower(*group.follower_side[0], follow, 8, [this](const std::string &w) { follow.abort(w); },
                                  options);
        });
    }
    // The follower's result within 10 s; the error text when it threw (status checked).
    std::string follower_error(dbrx_status want) {
        if (served.wait_for(10s) != std::future_status::ready) {
            ADD_FAILURE() << "the follower did not stop within 10 s";
            std::abort();  // its thread would outlive the test's objects
        }
        try {
            served.get();
        } catch (const Error &e) {
            EXPECT_EQ(e.status(), want) << e.what();
            return e.what();
        }
        ADD_FAILURE() << "the follower returned normally";
        return {};
    }
};

TEST(DistStepFollower, RunsExactlyTheLeadersStepsThenStopsOnShutdown) {
    Pair p;
    p.lead->memory = 5000;
    p.follow.memory = 1000;
    EXPECT_EQ(p.leader->kv_memory_available(), 1000);  // the least over the processes
    auto pool = p.leader->create_kv_pool(32, 16);
    EXPECT_EQ(pool->n_blocks(), 32);
    const std::vector<int32_t> t1{1, 2, 3}, b1{0}, t2{9}, b2{1, 2}, t3{4, 5, 6, 7, 8}, b3{3, 4, 5};
    std::vector<float> logits(16);
    p.leader->forward(*pool, std::vector<SeqStep>{{t1, 0, b1, true}, {t2, 17, b2, false}}, logits.data());
    std::this_thread::sleep_for(120ms);  // heartbeats in between must be skipped
    p.leader->forward(*pool, std::vector<SeqStep>{{t2, 3, b1, false}}, logits.data());
    std::vector<LogitsSummary> out(2);
    const std::vector<LogitsNeed> needs{{5, 0.5f}, {0, 0.0f}};
    // The recorders decline to summarise: the leader says so, and the follower did the same (nothing).
    EXPECT_FALSE(p.leader->forward_summarized(*pool, std::vector<SeqStep>{{t3, 0, b3, true}, {t1, 3, b1, true}},
                                              needs, out));
    EXPECT_THROW(p.leader->forward_summarized(*pool, std::vector<SeqStep>{{t3, 0, b3, true}}, needs, out), Error);
    pool.reset();
    auto second = p.leader->create_kv_pool(8, 4);
    p.leader->forward(*second, std::vector<SeqStep>{{t3, 0, b3, true}}, logits.data());
    second.reset();
    const auto want = p.lead->recorded();  // p.lead goes with the leader
    p.leader.reset();                      // dbrx_model_free on process 0: Shutdown

    ASSERT_EQ(p.served.wait_for(10s), std::future_status::ready);
    const FollowerStats st = p.served.get();
    const auto got = p.follow.recorded();
    ASSERT_EQ(want.size(), 4u);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
        SCOPED_TRACE("step " + std::to_string(i));
        testing::expect_same_step(got[i], want[i]);
    }
    EXPECT_EQ(got[0].seqs[1].pos0, 17);
    EXPECT_TRUE(got[2].summarized);
    EXPECT_EQ(st.steps, 4);
    EXPECT_EQ(st.failed_steps, 0);
    EXPECT_EQ(st.pools, 2);
    EXPECT_EQ(p.follow.pools, (std::vector<std::pair<int32_t, int32_t>>{{32, 16}, {8, 4}}));
    EXPECT_EQ(p.follow.pools_freed, 2);
    EXPECT_EQ(p.follow.abort_count(), 0u);
}

// The engine's own schedule (several requests, prefill chunks, decodes, pool per engine) reaches
// the follower unchanged: the follower's fake model recomputes every KV entry through the block
// tables it received, so a wrong or missing step shows up as a failed step.
TEST(DistStepFollower, ReplaysTheEnginesScheduleThroughTheCApi) {
    constexpr int32_t kVocab = 64;
    testing::FakeBackend *lead = nullptr;
    dbrx_model *model = testing::make_fake_model(kVocab, 256, {}, &lead);
    lead->log_batches = true;
    testing::FakeBackend follow(kVocab);
    follow.log_batches = true;
    testing::StepGroup g = testing::step_group(1);
    auto link = std::make_shared<LeaderLink>(std::move(g.leader_side), fast_options());
    model->backend = std::make_unique<LeaderBackend>(std::move(model->backend), nullptr, link);
    auto served = std::async(std::launch::async, [&] {
        return serve_follower(*g.follower_side[0], follow, kVocab, nullptr, fast_options());
    });

    dbrx_engine_params ep = dbrx_engine_default_params();
    ep.kv_blocks = 64;
    ep.block_size = 4;
    ep.max_batch_tokens = 8;  // chunked prefills
    dbrx_engine *engine = nullptr;
    ASSERT_EQ(dbrx_engine_create(model, &ep, &engine), DBRX_OK) << dbrx_last_error();
    const std::vector<std::vector<int32_t>> prompts{{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, {7, 7}, {3, 1, 4, 1, 5}};
    std::vector<uint64_t> ids(prompts.size());
    dbrx_sampling_params sp = dbrx_sampling_default_params();
    sp.max_tokens = 6;
    sp.n_stop_ids = 0;
    for (size_t i = 0; i < prompts.size(); ++i)
        ASSERT_EQ(dbrx_engine_submit(engine, prompts[i].data(), static_cast<int32_t>(prompts[i].size()), &sp, &ids[i]),
                  DBRX_OK);
    for (size_t i = 0; i < prompts.size(); ++i) {
        std::vector<int32_t> got;
        dbrx_finish_reason finish = DBRX_FINISH_NONE;
        const auto deadline = Clock::now() + 20s;
        while (finish == DBRX_FINISH_NONE && Clock::now() < deadline) {
            dbrx_token toks[8];
            int32_t n = 0;
            const dbrx_status st = dbrx_engine_poll(engine, ids[i], 100, toks, 8, &n, &finish);
            ASSERT_TRUE(st == DBRX_OK || st == DBRX_ERR_TIMEOUT) << dbrx_last_error();
            for (int32_t k = 0; k < n; ++k) got.push_back(toks[k].id);
        }
        EXPECT_EQ(finish, DBRX_FINISH_LENGTH);
        EXPECT_EQ(got, testing::fake_reference_greedy(prompts[i], kVocab, 6)) << "request " << i;
    }
    dbrx_engine_free(engine);
    const auto lead_log = lead->batch_log;
    const int64_t lead_forwards = lead->forwards.load();
    dbrx_model_free(model);  // Shutdown
    ASSERT_EQ(served.wait_for(10s), std::future_status::ready);
    const FollowerStats st = served.get();
    EXPECT_EQ(st.failed_steps, 0);
    EXPECT_EQ(st.pools, 1);
    EXPECT_EQ(follow.batch_log, lead_log);
    EXPECT_GT(st.steps, 6);
    EXPECT_GE(st.steps, lead_forwards);  // and the summarised calls both sides declined
    EXPECT_EQ(follow.forwards.load(), lead_forwards);
}

TEST(DistStepFollower, LeaderThatClosesOrFallsSilentIsEngineDead) {
    {
        testing::StepGroup g = testing::step_group(1);
        StepRecorder follow;
        auto served = std::async(std::launch::async, [&] {
            return serve_follower(*g.follower_side[0], follow, 8, [&](const std::string &w) { follow.abort(w); },
                                  fast_options());
        });
        g.leader_side[0].reset();  // process 0 exits without dbrx_model_free
        ASSERT_EQ(served.wait_for(10s), std::future_status::ready);
        try {
            served.get();
            ADD_FAILURE() << "serve returned normally";
        } catch (const Error &e) {
            EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD);
            EXPECT_TRUE(has(e.what(), "process 0 closed its step channel without a shutdown")) << e.what();
            EXPECT_TRUE(has(e.what(), "process 0 (127.0.0.1:")) << e.what();
        }
        EXPECT_EQ(follow.abort_count(), 1u);  // its collectives are failed too: freeing the model is quick
    }
    {
        testing::StepGroup g = testing::step_group(1);  // no LeaderLink: no heartbeats
        StepRecorder follow;
        StepGroupOptions o = fast_options();
        o.idle_timeout = 300ms;
        const auto start = Clock::now();
        try {
            serve_follower(*g.follower_side[0], follow, 8, nullptr, o);
            ADD_FAILURE() << "serve returned normally";
        } catch (const Error &e) {
            EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD);
            EXPECT_TRUE(has(e.what(), "nothing (not even a heartbeat) from process 0 for 300 ms")) << e.what();
        }
        EXPECT_LT(Clock::now() - start, 5s);
    }
}

TEST(DistStepFollower, HeartbeatsKeepAQuietLeaderAlive) {
    StepGroupOptions o = fast_options();
    o.idle_timeout = 300ms;
    Pair p(o);
    std::this_thread::sleep_for(1s);  // three idle timeouts without a command
    auto pool = p.leader->create_kv_pool(4, 4);
    pool.reset();
    p.leader.reset();
    ASSERT_EQ(p.served.wait_for(10s), std::future_status::ready);
    EXPECT_EQ(p.served.get().pools, 1);
}

// Process 0 dies while this process is in a step, waiting in a collective that cannot finish: the
// close of the channel aborts it at once rather than at the collective's timeout.
TEST(DistStepFollower, LeaderDyingMidStepAbortsTheStep) {
    testing::StepGroup g = testing::step_group(1);
    StepRecorder follow;
    follow.hang_token = 666;
    auto served = std::async(std::launch::async, [&] {
        return serve_follower(*g.follower_side[0], follow, 8, [&](const std::string &w) { follow.abort(w); },
                              fast_options());
    });
    StepConnection &leader = *g.leader_side[0];
    leader.send(StepMsg::CreatePool, encode(StepPoolCommand{1, 4, 4}), 1s);
    EXPECT_EQ(decode_reply(leader.receive(5s).payload).status, DBRX_OK);
    StepCommand c;
    c.pool = 1;
    c.seqs.push_back({{666}, 0, {0}, true});
    leader.send(StepMsg::Step, encode(c), 1s);
    std::this_thread::sleep_for(100ms);
    const auto start = Clock::now();
    g.leader_side[0].reset();
    ASSERT_EQ(served.wait_for(10s), std::future_status::ready);
    EXPECT_LT(Clock::now() - start, 5s) << "the step waited for its own timeout";
    try {
        served.get();
        ADD_FAILURE() << "serve returned normally";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD);
        EXPECT_TRUE(has(e.what(), "collective aborted: process 0 closed its step channel")) << e.what();
    }
}

// A step failing on a follower fails process 0's step at once (its collective is aborted), and
// every later step of process 0 names the follower.
TEST(DistStepFollower, FollowerFailureFailsTheLeaderFast) {
    Pair p;
    p.follow.fatal_token = 13;
    p.lead->hang_token = 13;  // process 0's ranks wait in the collective for the failed process
    auto pool = p.leader->create_kv_pool(4, 4);
    const std::vector<int32_t> t{13}, b{0};
    std::vector<float> logits(8);
    const auto start = Clock::now();
    try {
        p.leader->forward(*pool, std::vector<SeqStep>{{t, 0, b, true}}, logits.data());
        ADD_FAILURE() << "the step succeeded";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD);
        EXPECT_TRUE(has(e.what(), "process 1 (")) << e.what();
        EXPECT_TRUE(has(e.what(), "injected rank failure")) << e.what();
    }
    EXPECT_LT(Clock::now() - start, 5s);
    EXPECT_TRUE(has(p.follower_error(DBRX_ERR_ENGINE_DEAD), "step 0 failed here: recorder: injected rank failure"));
    const std::vector<int32_t> ok{1};
    try {
        p.leader->forward(*pool, std::vector<SeqStep>{{ok, 1, b, true}}, logits.data());
        ADD_FAILURE() << "a step ran without the failed process";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD);
        EXPECT_TRUE(has(e.what(), "process 1 (")) << e.what();
    }
    EXPECT_EQ(p.lead->recorded().size(), 1u);
}

// Process 0's own ranks fail: a follower waiting in that step's collectives is released at once.
TEST(DistStepFollower, LeaderFailureReleasesTheFollowers) {
    Pair p;
    p.lead->fatal_token = 21;
    p.follow.hang_token = 21;
    auto pool = p.leader->create_kv_pool(4, 4);
    const std::vector<int32_t> t{21}, b{0};
    std::vector<float> logits(8);
    const auto start = Clock::now();
    EXPECT_THROW(p.leader->forward(*pool, std::vector<SeqStep>{{t, 0, b, true}}, logits.data()), Error);
    const std::string e = p.follower_error(DBRX_ERR_ENGINE_DEAD);
    EXPECT_LT(Clock::now() - start, 5s) << "the follower waited for its own timeout";
    EXPECT_TRUE(has(e, "collective aborted: process 0 closed its step channel")) << e;
    try {
        p.leader->forward(*pool, std::vector<SeqStep>{{t, 1, b, true}}, logits.data());
        ADD_FAILURE() << "a step ran after process 0 failed";
    } catch (const Error &err) {
        EXPECT_EQ(err.status(), DBRX_ERR_ENGINE_DEAD);
        EXPECT_TRUE(has(err.what(), "process 0's step failed: recorder: injected rank failure")) << err.what();
    }
}

// A follower killed while process 0 is idle: process 0's collectives are aborted right away and its
// next step fails naming the follower, without running.
TEST(DistStepFollower, FollowerThatDisappearsIsNamed) {
    Pair p(fast_options(), false);
    p.group.follower_side[0].reset();
    const std::optional<std::string> why = p.lead->wait_abort(5s);
    ASSERT_TRUE(why.has_value()) << "process 0's group was not aborted";
    EXPECT_TRUE(has(*why, "process 1 (127.0.0.1) closed its step channel (the process exited or crashed)")) << *why;
    EXPECT_THROW(p.leader->create_kv_pool(4, 4), Error);
    EXPECT_TRUE(p.lead->recorded().empty());
}

TEST(DistStepFollower, PoolFailureOnAFollowerFailsOnlyThatPool) {
    Pair p;
    p.follow.fail_pools = true;
    try {
        p.leader->create_kv_pool(1000, 16);
        ADD_FAILURE() << "the pool was created";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_OUT_OF_MEMORY);
        EXPECT_TRUE(has(e.what(), "process 1: recorder: no room for 1000 blocks")) << e.what();
    }
    EXPECT_EQ(p.lead->pools_freed, 1);                 // process 0's own share is freed again
    EXPECT_EQ(p.leader->kv_memory_available(), 1 << 20);  // and the follower still serves
    p.leader.reset();
    ASSERT_EQ(p.served.wait_for(10s), std::future_status::ready);
    EXPECT_EQ(p.served.get().pools, 0);
}

TEST(DistStepFollower, CApiRefusals) {
    EXPECT_EQ(dbrx_model_serve(nullptr), DBRX_ERR_INVALID_ARGUMENT);
    dbrx_model *single = testing::make_fake_model(16, 64, {});
    EXPECT_EQ(dbrx_model_serve(single), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(has(dbrx_last_error(), "dbrx_model_serve is for processes with node_rank > 0")) << dbrx_last_error();
    single->is_follower = true;  // as dbrx_model_load leaves process 1 of 2
    single->node_rank = 1;
    single->n_nodes = 2;
    dbrx_engine_params ep = dbrx_engine_default_params();
    ep.kv_blocks = 8;
    dbrx_engine *engine = nullptr;
    EXPECT_EQ(dbrx_engine_create(single, &ep, &engine), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(has(dbrx_last_error(), "process 1 of 2")) << dbrx_last_error();
    EXPECT_TRUE(has(dbrx_last_error(), "call dbrx_model_serve(model)")) << dbrx_last_error();
    EXPECT_EQ(engine, nullptr);
    EXPECT_EQ(dbrx_model_serve(single), DBRX_ERR_INVALID_ARGUMENT);  // its channel is gone (served once)
    EXPECT_TRUE(has(dbrx_last_error(), "already ran")) << dbrx_last_error();
    dbrx_model_free(single);
}

TEST(DistStepFollower, CliServeRankRefusesProcessZeroAndTheCpu) {
    const std::string cli = DBRX_CLI_PATH;
    const std::string model = std::string(" --model ") + DBRX_SOURCE_DIR + "/fixtures/tiny-dbrx";
    EXPECT_EQ(std::system((cli + " serve-rank" + model + " --device cuda --node-rank 0 2>/dev/null").c_str()), 2 << 8);
    EXPECT_EQ(std::system((cli + " serve-rank" + model + " --device cpu --node-rank 1 2>/dev/null").c_str()), 2 << 8);
}

}  // namespace
}  // namespace dbrx::dist
