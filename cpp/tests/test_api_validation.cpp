// Every invalid input is refused with a status and a message naming the field, and nothing is lost
// for the requests already running meanwhile.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "test_engine_fake_backend.h"
#include "test_engine_harness.h"

namespace dbrx::testing {
namespace {

constexpr int32_t kVocab = 64;
constexpr int32_t kCtx = 256;

std::vector<int32_t> prompt_of(int32_t len, uint64_t salt) { return hashed_prompt(len, salt, 1, 60); }

dbrx_sampling_params greedy(int32_t max_tokens) {
    dbrx_sampling_params s = dbrx_sampling_default_params();
    s.max_tokens = max_tokens;
    s.n_stop_ids = 0;
    return s;
}

class ApiValidation : public ::testing::Test {
protected:
    void SetUp() override {
        model_.reset(make_fake_model(kVocab, kCtx, {63}, &backend_));
        dbrx_engine_params p = dbrx_engine_default_params();
        p.kv_blocks = 32;  // 512 tokens
        engine_ = make_engine(model_.get(), p);
    }
    // Runs `check` while four requests are being served, then verifies they all finished correctly.
    void with_running_requests(const std::function<void()> &check) {
        backend_->step_delay_us = 300;
        std::vector<std::vector<int32_t>> prompts;
        std::vector<uint64_t> ids;
        for (int i = 0; i < 4; ++i) {
            prompts.push_back(prompt_of(20 + 9 * i, 100 * i));
            ids.push_back(submit_ok(engine_.get(), prompts.back(), greedy(40)));
        }
        check();
        for (size_t i = 0; i < ids.size(); ++i) {
            Outcome o = drain(engine_.get(), ids[i], kVocab, false);
            EXPECT_EQ(o.finish, DBRX_FINISH_LENGTH) << o.error;
            EXPECT_EQ(o.ids, fake_reference_greedy(prompts[i], kVocab, 40));
        }
        backend_->step_delay_us = 0;
    }
    void expect_rejected(const std::vector<int32_t> &prompt, const dbrx_sampling_params &s, dbrx_status status,
                         const std::string &needle) {
        uint64_t id = 777;
        dbrx_status st = dbrx_engine_submit(engine_.get(), prompt.data(), static_cast<int32_t>(prompt.size()), &s, &id);
        EXPECT_EQ(st, status) << needle;
        EXPECT_NE(std::string(dbrx_last_error()).find(needle), std::string::npos)
            << "message '" << dbrx_last_error() << "' should name " << needle;
        EXPECT_EQ(id, 777u);
    }
    ModelPtr model_;
    FakeBackend *backend_ = nullptr;
    EnginePtr engine_;
};

TEST_F(ApiValidation, InvalidSamplingIsRejectedWhileOthersFinish) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    struct Bad {
        std::function<void(dbrx_sampling_params &)> set;
        std::string field;
    };
    const std::vector<Bad> bad = {
        {[&](auto &s) { s.temperature = nan; }, "temperature"},
        {[&](auto &s) { s.temperature = inf; }, "temperature"},
        {[&](auto &s) { s.temperature = -0.5f; }, "temperature"},
        {[&](auto &s) { s.top_p = 0.0f; }, "top_p"},
        {[&](auto &s) { s.top_p = 1.01f; }, "top_p"},
        {[&](auto &s) { s.top_p = nan; }, "top_p"},
        {[&](auto &s) { s.top_k = -2; }, "top_k"},
        {[&](auto &s) { s.min_p = -0.01f; }, "min_p"},
        {[&](auto &s) { s.min_p = 1.5f; }, "min_p"},
        {[&](auto &s) { s.min_p = nan; }, "min_p"},
        {[&](auto &s) { s.repetition_penalty = 0.0f; }, "repetition_penalty"},
        {[&](auto &s) { s.repetition_penalty = inf; }, "repetition_penalty"},
        {[&](auto &s) { s.presence_penalty = nan; }, "presence_penalty"},
        {[&](auto &s) { s.frequency_penalty = -inf; }, "frequency_penalty"},
        {[&](auto &s) { s.max_tokens = 0; }, "max_tokens"},
        {[&](auto &s) { s.max_tokens = -3; }, "max_tokens"},
        {[&](auto &s) { s.top_logprobs = DBRX_MAX_TOP_LOGPROBS + 1; }, "top_logprobs"},
        {[&](auto &s) { s.top_logprobs = -1; }, "top_logprobs"},
        {[&](auto &s) { s.n_stop_ids = DBRX_MAX_STOP_IDS + 1; }, "n_stop_ids"},
        {[&](auto &s) { s.n_stop_ids = -2; }, "n_stop_ids"},
        {[&](auto &s) { s.n_stop_ids = 1; s.stop_ids[0] = kVocab; }, "stop_ids[0]"},
        {[&](auto &s) { s.max_tokens = kCtx; }, "max_ctx"},
    };
    with_running_requests([&] {
        for (const Bad &b : bad) {
            dbrx_sampling_params s = greedy(8);
            b.set(s);
            expect_rejected(prompt_of(5, 1), s, DBRX_ERR_INVALID_ARGUMENT, b.field);
        }
        // top_k = -1 and 0 both mean "off".
        for (int32_t k : {-1, 0}) {
            dbrx_sampling_params s = greedy(3);
            s.top_k = k;
            s.temperature = 0.7f;
            Outcome o = drain(engine_.get(), submit_ok(engine_.get(), prompt_of(4, 9), s), kVocab, false);
            EXPECT_EQ(o.ids.size(), 3u);
        }
    });
}

TEST_F(ApiValidation, InvalidPromptsAreRejectedWhileOthersFinish) {
    with_running_requests([&] {
        expect_rejected({}, greedy(4), DBRX_ERR_INVALID_ARGUMENT, "prompt is empty");
        expect_rejected({1, 2, -1}, greedy(4), DBRX_ERR_INVALID_ARGUMENT, "prompt[2] = -1");
        expect_rejected({kVocab}, greedy(4), DBRX_ERR_INVALID_ARGUMENT, "prompt[0] = 64");
        expect_rejected(prompt_of(200, 3), greedy(57), DBRX_ERR_INVALID_ARGUMENT, "max_ctx = 256");
        uint64_t id = 0;
        dbrx_sampling_params s = greedy(4);
        EXPECT_EQ(dbrx_engine_submit(engine_.get(), nullptr, 3, &s, &id), DBRX_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(dbrx_engine_submit(engine_.get(), nullptr, -1, &s, &id), DBRX_ERR_INVALID_ARGUMENT);
        std::vector<int32_t> p = {1, 2};
        EXPECT_EQ(dbrx_engine_submit(engine_.get(), p.data(), 2, nullptr, &id), DBRX_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(dbrx_engine_submit(engine_.get(), p.data(), 2, &s, nullptr), DBRX_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(dbrx_engine_submit(nullptr, p.data(), 2, &s, &id), DBRX_ERR_INVALID_ARGUMENT);
    });
}

TEST_F(ApiValidation, RequestLargerThanThePoolIsRejectedNamingTheLimit) {
    dbrx_engine_params p = dbrx_engine_default_params();
    p.kv_blocks = 4;
    p.block_size = 8;  // 32 tokens
    EnginePtr small = make_engine(model_.get(), p);
    std::vector<int32_t> prompt = prompt_of(20, 2);
    dbrx_sampling_params s = greedy(14);  // 20 + 14 - 1 = 33 > 32
    uint64_t id = 0;
    EXPECT_EQ(dbrx_engine_submit(small.get(), prompt.data(), 20, &s, &id), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(dbrx_last_error()).find("KV pool capacity of 32 tokens"), std::string::npos) << dbrx_last_error();
    s.max_tokens = 13;  // exactly fits
    Outcome o = drain(small.get(), submit_ok(small.get(), prompt, s), kVocab, false);
    EXPECT_EQ(o.ids, fake_reference_greedy(prompt, kVocab, 13));
}

TEST_F(ApiValidation, QueueFullIsRejectedNotDropped) {
    dbrx_engine_params p = dbrx_engine_default_params();
    p.kv_blocks = 64;
    p.max_running = 1;
    p.max_waiting = 2;
    EnginePtr e = make_engine(model_.get(), p);
    backend_->step_delay_us = 500;
    std::vector<int32_t> prompt = prompt_of(10, 4);
    uint64_t a = submit_ok(e.get(), prompt, greedy(30));
    dbrx_token tok[1];
    int32_t n = 0;
    dbrx_finish_reason f;
    ASSERT_EQ(dbrx_engine_poll(e.get(), a, 10000, tok, 1, &n, &f), DBRX_OK);  // a is running
    uint64_t b = submit_ok(e.get(), prompt, greedy(5));
    uint64_t c = submit_ok(e.get(), prompt, greedy(5));
    uint64_t id = 0;
    dbrx_sampling_params s = greedy(5);
    EXPECT_EQ(dbrx_engine_submit(e.get(), prompt.data(), 10, &s, &id), DBRX_ERR_QUEUE_FULL);
    EXPECT_NE(std::string(dbrx_last_error()).find("max_waiting = 2"), std::string::npos);
    EXPECT_EQ(stats_of(e.get()).waiting, 2);
    backend_->step_delay_us = 0;
    auto expected = fake_reference_greedy(prompt, kVocab, 30);
    Outcome oa = drain(e.get(), a, kVocab, false);
    EXPECT_EQ(oa.ids, std::vector<int32_t>(expected.begin() + 1, expected.end()));
    EXPECT_EQ(drain(e.get(), b, kVocab, false).ids, std::vector<int32_t>(expected.begin(), expected.begin() + 5));
    EXPECT_EQ(drain(e.get(), c, kVocab, false).ids, std::vector<int32_t>(expected.begin(), expected.begin() + 5));
    // Room again.
    EXPECT_EQ(drain(e.get(), submit_ok(e.get(), prompt, s), kVocab, false).ids.size(), 5u);
}

TEST_F(ApiValidation, NonFiniteLogitsFailOnlyThatRequest) {
    backend_->nan_token = 61;
    with_running_requests([&] {
        Outcome o = drain(engine_.get(), submit_ok(engine_.get(), {1, 2, 61}, greedy(4)), kVocab, false);
        EXPECT_EQ(o.finish, DBRX_FINISH_ERROR);
        EXPECT_NE(o.error.find("no finite logit"), std::string::npos) << o.error;
    });
}

TEST_F(ApiValidation, EngineParamsAreChecked) {
    struct Bad {
        std::function<void(dbrx_engine_params &)> set;
        std::string field;
        dbrx_status status = DBRX_ERR_INVALID_ARGUMENT;
    };
    const std::vector<Bad> bad = {
        {[](auto &p) { p.block_size = 0; }, "block_size"},
        {[](auto &p) { p.max_batch_tokens = 0; }, "max_batch_tokens"},
        {[](auto &p) { p.max_running = 0; }, "max_running"},
        {[](auto &p) { p.max_waiting = 0; }, "max_waiting"},
        {[](auto &p) { p.kv_blocks = -1; }, "kv_blocks"},
        {[](auto &p) { p.kv_cache_bytes = -5; }, "kv_cache_bytes"},
        {[](auto &p) { p.kv_cache_bytes = 100; }, "kv_cache_bytes"},  // a block of 16 takes 128 bytes here
        {[](auto &p) { p.kv_cache_fraction = std::nanf(""); }, "kv_cache_fraction"},
        {[](auto &p) { p.kv_cache_fraction = 0.0f; }, "kv_cache_fraction"},
        {[](auto &p) { p.kv_cache_fraction = 1.5f; }, "kv_cache_fraction"},
        {[](auto &p) { p.max_ctx = kCtx + 1; }, "max_ctx"},
        {[](auto &p) { p.max_ctx = -1; }, "max_ctx"},
        {[](auto &p) { p.kv_cache_fraction = 1e-9f; }, "no memory for a KV block", DBRX_ERR_OUT_OF_MEMORY},
    };
    for (const Bad &b : bad) {
        dbrx_engine_params p = dbrx_engine_default_params();
        b.set(p);
        dbrx_engine *e = reinterpret_cast<dbrx_engine *>(0x1);
        EXPECT_EQ(dbrx_engine_create(model_.get(), &p, &e), b.status) << b.field;
        EXPECT_EQ(e, nullptr);
        EXPECT_NE(std::string(dbrx_last_error()).find(b.field), std::string::npos) << dbrx_last_error();
    }
    // Sizing: bytes, then fraction of what the backend offers (1 MiB at 128 bytes a block).
    dbrx_engine_params p = dbrx_engine_default_params();
    p.kv_cache_bytes = 128 * 10 + 5;
    EnginePtr by_bytes = make_engine(model_.get(), p);
    EXPECT_EQ(stats_of(by_bytes.get()).blocks_total, 10);
    p = dbrx_engine_default_params();
    p.kv_cache_fraction = 0.5f;
    EnginePtr by_fraction = make_engine(model_.get(), p);
    EXPECT_EQ(stats_of(by_fraction.get()).blocks_total, 4096);
    EXPECT_EQ(stats_of(by_fraction.get()).kv_capacity_tokens, 4096 * 16);
}

TEST_F(ApiValidation, NullPointersAndUnavailableLogits) {
    dbrx_engine_params ep = dbrx_engine_default_params();
    dbrx_engine *e = nullptr;
    EXPECT_EQ(dbrx_engine_create(nullptr, &ep, &e), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_create(model_.get(), nullptr, &e), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_create(model_.get(), &ep, nullptr), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(dbrx_last_error()).find("out is NULL"), std::string::npos);
    dbrx_engine_stats st;
    EXPECT_EQ(dbrx_engine_get_stats(nullptr, &st), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_get_stats(engine_.get(), nullptr), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_cancel(nullptr, 1), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_release(nullptr, 1), DBRX_ERR_INVALID_ARGUMENT);
    dbrx_model_info info;
    EXPECT_EQ(dbrx_model_get_info(nullptr, &info), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_model_get_info(model_.get(), nullptr), DBRX_ERR_INVALID_ARGUMENT);
    dbrx_engine_free(nullptr);
    dbrx_model_free(nullptr);

    std::vector<int32_t> prompt = prompt_of(6, 5);
    uint64_t id = submit_ok(engine_.get(), prompt, greedy(3));
    dbrx_token tok[2];
    int32_t n;
    dbrx_finish_reason f;
    EXPECT_EQ(dbrx_engine_poll(engine_.get(), id, 0, nullptr, 2, &n, &f), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_poll(engine_.get(), id, 0, tok, 0, &n, &f), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_poll(engine_.get(), id, 0, tok, 2, nullptr, &f), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_poll(engine_.get(), id, 0, tok, 2, &n, nullptr), DBRX_ERR_INVALID_ARGUMENT);
    std::vector<float> logits(kVocab);
    EXPECT_EQ(dbrx_engine_get_prompt_logits(engine_.get(), id, logits.data(), kVocab), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(dbrx_last_error()).find("keep_prompt_logits"), std::string::npos);
    Outcome o = drain(engine_.get(), id, kVocab, false);
    EXPECT_EQ(o.ids.size(), 3u);

    dbrx_sampling_params keep = greedy(2);
    keep.keep_prompt_logits = true;
    id = submit_ok(engine_.get(), prompt, keep);
    ASSERT_EQ(dbrx_engine_poll(engine_.get(), id, 10000, tok, 2, &n, &f), DBRX_OK);
    EXPECT_EQ(dbrx_engine_get_prompt_logits(engine_.get(), id, logits.data(), kVocab - 1), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_get_prompt_logits(engine_.get(), id, nullptr, kVocab), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_engine_get_prompt_logits(engine_.get(), id, logits.data(), kVocab), DBRX_OK);
    EXPECT_EQ(logits, fake_reference_logits(prompt, kVocab));
    EXPECT_EQ(dbrx_engine_release(engine_.get(), id), DBRX_OK);
    EXPECT_EQ(dbrx_engine_get_prompt_logits(engine_.get(), id, logits.data(), kVocab), DBRX_ERR_NOT_FOUND);
}

TEST_F(ApiValidation, GenerateRunsOneRequestAndCapsItsLength) {
    std::vector<int32_t> prompt = prompt_of(12, 6);
    dbrx_sampling_params s = greedy(50);
    std::vector<int32_t> ids(10);
    std::vector<float> logits(kVocab);
    int32_t n = 0;
    dbrx_finish_reason f = DBRX_FINISH_NONE;
    ASSERT_EQ(dbrx_generate(engine_.get(), prompt.data(), 12, &s, ids.data(), 10, &n, logits.data(), &f), DBRX_OK)
        << dbrx_last_error();
    EXPECT_EQ(n, 10);
    EXPECT_EQ(f, DBRX_FINISH_LENGTH);
    EXPECT_EQ(ids, fake_reference_greedy(prompt, kVocab, 10));
    EXPECT_EQ(logits, fake_reference_logits(prompt, kVocab));
    EXPECT_EQ(dbrx_generate(engine_.get(), prompt.data(), 12, &s, ids.data(), 0, &n, nullptr, &f), DBRX_ERR_INVALID_ARGUMENT);
    s.top_p = 2;
    EXPECT_EQ(dbrx_generate(engine_.get(), prompt.data(), 12, &s, ids.data(), 10, &n, nullptr, &f), DBRX_ERR_INVALID_ARGUMENT);
    dbrx_engine_stats st = stats_of(engine_.get());
    EXPECT_EQ(st.running + st.waiting, 0);
    EXPECT_EQ(st.blocks_used, 0);
}

TEST(Api, StatusNamesVersionAndLoadErrors) {
    EXPECT_STREQ(dbrx_status_name(DBRX_OK), "OK");
    EXPECT_STREQ(dbrx_status_name(DBRX_ERR_ENGINE_DEAD), "ENGINE_DEAD");
    dbrx_status unknown;
    const int32_t code = 99;
    std::memcpy(&unknown, &code, sizeof(code));
    EXPECT_STREQ(dbrx_status_name(unknown), "UNKNOWN_STATUS");
    EXPECT_STREQ(dbrx_version(), "0.1.0");
    dbrx_model_params p = dbrx_model_default_params();
    dbrx_model *m = reinterpret_cast<dbrx_model *>(0x1);
    EXPECT_NE(dbrx_model_load("/nonexistent/dbrx", &p, &m), DBRX_OK);
    EXPECT_EQ(m, nullptr);
    EXPECT_NE(std::string(dbrx_last_error()).find("/nonexistent/dbrx"), std::string::npos) << dbrx_last_error();
    EXPECT_EQ(dbrx_model_load(nullptr, &p, &m), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_model_load("/x", nullptr, &m), DBRX_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dbrx_model_load("/x", &p, nullptr), DBRX_ERR_INVALID_ARGUMENT);
    p.n_threads = -1;
    EXPECT_EQ(dbrx_model_load("/x", &p, &m), DBRX_ERR_INVALID_ARGUMENT);
    p = dbrx_model_default_params();
    const int32_t not_a_device = 7;  // as a C caller could pass it
    std::memcpy(&p.device, &not_a_device, sizeof(not_a_device));
    EXPECT_EQ(dbrx_model_load("/x", &p, &m), DBRX_ERR_INVALID_ARGUMENT);
}

}  // namespace
}  // namespace dbrx::testing
