// Helpers for driving an engine through the C API in tests: submit a set of requests together
// (or one at a time), poll them all to completion, collect ids, finish reasons and prompt logits.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dbrx/dbrx.h"

namespace dbrx::testing {

struct Outcome {
    std::vector<int32_t> ids;
    std::vector<dbrx_token> tokens;
    dbrx_finish_reason finish = DBRX_FINISH_NONE;
    std::vector<float> prompt_logits;
    std::string error;
};

struct EngineDeleter {
    void operator()(dbrx_engine *e) const { dbrx_engine_free(e); }
};
struct ModelDeleter {
    void operator()(dbrx_model *m) const { dbrx_model_free(m); }
};
using EnginePtr = std::unique_ptr<dbrx_engine, EngineDeleter>;
using ModelPtr = std::unique_ptr<dbrx_model, ModelDeleter>;

inline EnginePtr make_engine(dbrx_model *model, const dbrx_engine_params &params) {
    dbrx_engine *e = nullptr;
    dbrx_status st = dbrx_engine_create(model, &params, &e);
    EXPECT_EQ(st, DBRX_OK) << dbrx_last_error();
    return EnginePtr(e);
}

inline uint64_t submit_ok(dbrx_engine *e, const std::vector<int32_t> &prompt, const dbrx_sampling_params &s) {
    uint64_t id = 0;
    dbrx_status st = dbrx_engine_submit(e, prompt.data(), static_cast<int32_t>(prompt.size()), &s, &id);
    EXPECT_EQ(st, DBRX_OK) << dbrx_last_error();
    return id;
}

// Polls one request until it finishes, then releases it.
inline Outcome drain(dbrx_engine *e, uint64_t id, int32_t n_vocab, bool want_logits) {
    Outcome out;
    dbrx_token buf[8];
    for (;;) {
        int32_t n = 0;
        dbrx_finish_reason f = DBRX_FINISH_NONE;
        dbrx_status st = dbrx_engine_poll(e, id, 10000, buf, 8, &n, &f);
        if (st == DBRX_ERR_TIMEOUT) {
            ADD_FAILURE() << "request " << id << " made no progress in 10 s";
            break;
        }
        EXPECT_EQ(st, DBRX_OK) << dbrx_last_error();
        if (st != DBRX_OK) break;
        for (int32_t i = 0; i < n; ++i) {
            out.ids.push_back(buf[i].id);
            out.tokens.push_back(buf[i]);
        }
        if (f != DBRX_FINISH_NONE) {
            out.finish = f;
            if (f == DBRX_FINISH_ERROR) out.error = dbrx_last_error();
            break;
        }
    }
    if (want_logits && !out.ids.empty()) {
        out.prompt_logits.resize(static_cast<size_t>(n_vocab));
        EXPECT_EQ(dbrx_engine_get_prompt_logits(e, id, out.prompt_logits.data(), n_vocab), DBRX_OK) << dbrx_last_error();
    }
    EXPECT_EQ(dbrx_engine_release(e, id), DBRX_OK) << dbrx_last_error();
    return out;
}

// All prompts submitted before any is polled, so they share the running batch.
inline std::vector<Outcome> run_together(dbrx_engine *e, const std::vector<std::vector<int32_t>> &prompts,
                                         const std::vector<dbrx_sampling_params> &sampling, int32_t n_vocab) {
    std::vector<uint64_t> ids;
    for (size_t i = 0; i < prompts.size(); ++i) ids.push_back(submit_ok(e, prompts[i], sampling[i]));
    std::vector<Outcome> out;
    for (size_t i = 0; i < prompts.size(); ++i) out.push_back(drain(e, ids[i], n_vocab, sampling[i].keep_prompt_logits));
    return out;
}

inline std::vector<Outcome> run_one_at_a_time(dbrx_engine *e, const std::vector<std::vector<int32_t>> &prompts,
                                              const std::vector<dbrx_sampling_params> &sampling, int32_t n_vocab) {
    std::vector<Outcome> out;
    for (size_t i = 0; i < prompts.size(); ++i)
        out.push_back(drain(e, submit_ok(e, prompts[i], sampling[i]), n_vocab, sampling[i].keep_prompt_logits));
    return out;
}

inline dbrx_engine_stats stats_of(dbrx_engine *e) {
    dbrx_engine_stats s{};
    EXPECT_EQ(dbrx_engine_get_stats(e, &s), DBRX_OK) << dbrx_last_error();
    return s;
}

}  // namespace dbrx::testing
