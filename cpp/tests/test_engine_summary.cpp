// The engine on a fake backend that summarises its logits (as the CUDA backend does on the device)
// must produce exactly what it produces on one that returns full rows: same ids, logprobs, top
// logprobs, finish reasons and prompt logits, for every kind of sampling; and for the kinds the
// summary can prove it must not fetch the rows.
#include <gtest/gtest.h>

#include <cstring>

#include "test_engine_fake_backend.h"
#include "test_engine_harness.h"

namespace dbrx::testing {
namespace {

constexpr int32_t kVocab = 1000;
constexpr int32_t kCtx = 512;

std::vector<int32_t> prompt_of(int32_t len, uint64_t salt) { return hashed_prompt(len, salt, 131, kVocab - 1); }

struct Kind {
    const char *name;
    dbrx_sampling_params params;
    bool provable;  // every row sampled from its summary (keep_prompt_logits' first row aside)
};

std::vector<Kind> kinds() {
    auto base = [] {
        dbrx_sampling_params s = dbrx_sampling_default_params();
        s.max_tokens = 16;
        s.n_stop_ids = 0;
        s.has_seed = true;
        s.seed = 77;
        return s;
    };
    std::vector<Kind> k;
    k.push_back({"greedy", base(), true});
    dbrx_sampling_params s = base();
    s.logprobs = true;
    s.top_logprobs = DBRX_MAX_TOP_LOGPROBS;
    s.keep_prompt_logits = true;
    k.push_back({"greedy_logprobs_prompt_logits", s, true});
    s = base();
    s.temperature = 0.8f;
    s.top_k = 40;
    s.logprobs = true;
    s.top_logprobs = 3;
    k.push_back({"top_k", s, true});
    s = base();
    s.temperature = 0.5f;
    s.top_p = 0.3f;
    s.logprobs = true;
    k.push_back({"top_p_small", s, false});
    s = base();
    s.temperature = 1.0f;
    s.min_p = 0.9f;
    k.push_back({"min_p", s, true});
    s = base();
    s.temperature = 1.0f;
    s.top_p = 0.95f;
    k.push_back({"top_p_wide", s, false});
    s = base();
    s.temperature = 1.2f;
    k.push_back({"pure_temperature", s, false});
    s = base();
    s.temperature = 0.9f;
    s.top_k = 20;
    s.repetition_penalty = 1.2f;
    s.presence_penalty = 0.3f;
    s.frequency_penalty = 0.2f;
    k.push_back({"penalties", s, false});
    return k;
}

void expect_identical(const Outcome &a, const Outcome &b) {
    EXPECT_EQ(a.finish, b.finish) << a.error << " / " << b.error;
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.prompt_logits, b.prompt_logits);
    ASSERT_EQ(a.tokens.size(), b.tokens.size());
    for (size_t t = 0; t < a.tokens.size(); ++t) {
        EXPECT_EQ(std::memcmp(&a.tokens[t], &b.tokens[t], sizeof(dbrx_token)), 0) << "token " << t;
    }
}

TEST(EngineSummary, SummarisingBackendGivesIdenticalOutputs) {
    FakeBackend *plain_backend = nullptr, *summary_backend = nullptr;
    ModelPtr plain(make_fake_model(kVocab, kCtx, {kVocab - 1}, &plain_backend));
    ModelPtr summarising(make_fake_model(kVocab, kCtx, {kVocab - 1}, &summary_backend));
    summary_backend->summaries = true;
    dbrx_engine_params ep = dbrx_engine_default_params();
    ep.kv_blocks = 256;
    ep.max_batch_tokens = 48;  // chunked prefill: some steps carry no output row for a request
    EnginePtr a = make_engine(plain.get(), ep);
    EnginePtr b = make_engine(summarising.get(), ep);
    for (const Kind &kind : kinds()) {
        SCOPED_TRACE(kind.name);
        std::vector<std::vector<int32_t>> prompts;
        std::vector<dbrx_sampling_params> sampling;
        for (int32_t i = 0; i < 6; ++i) {
            prompts.push_back(prompt_of(3 + 17 * i, 1000 * static_cast<uint64_t>(i) + kind.params.top_k));
            dbrx_sampling_params s = kind.params;
            s.seed += static_cast<uint64_t>(i);
            sampling.push_back(s);
        }
        const int64_t summarized_before = summary_backend->rows_summarized, fetched_before = summary_backend->rows_fetched,
                      forwarded_before = summary_backend->rows_forwarded;
        auto want = run_together(a.get(), prompts, sampling, kVocab);
        auto got = run_together(b.get(), prompts, sampling, kVocab);
        for (size_t i = 0; i < prompts.size(); ++i) {
            SCOPED_TRACE("request " + std::to_string(i));
            EXPECT_EQ(want[i].finish, DBRX_FINISH_LENGTH);
            expect_identical(want[i], got[i]);
        }
        const int64_t rows = summary_backend->rows_forwarded - forwarded_before;
        const int64_t summarized = summary_backend->rows_summarized - summarized_before;
        const int64_t fetched = summary_backend->rows_fetched - fetched_before;
        std::printf("%-30s %3lld rows: %3lld summarised, %3lld of them fetched\n", kind.name, static_cast<long long>(rows),
                    static_cast<long long>(summarized), static_cast<long long>(fetched));
        EXPECT_EQ(rows, 6 * 16);
        if (kind.provable) {
            // Only the first row of a keep_prompt_logits request needs its full logits: fetched, or
            // the whole step goes through forward() when such rows are the majority.
            const int64_t first_rows = kind.params.keep_prompt_logits ? 6 : 0;
            EXPECT_LE(fetched, first_rows);
            EXPECT_GE(summarized, rows - first_rows);
        }
        const bool whole_vocabulary = kind.params.top_p == 1.0f && kind.params.top_k == 0 && kind.params.min_p == 0.0f &&
                                      kind.params.temperature > 0;
        if (kind.params.repetition_penalty != 1.0f || whole_vocabulary) EXPECT_EQ(summarized, 0) << "full rows in one copy";
    }
    EXPECT_EQ(plain_backend->rows_summarized + plain_backend->rows_fetched, 0);
}

TEST(EngineSummary, NarrowNucleusIsMostlySampledFromTheSummary) {
    FakeBackend *backend = nullptr;
    ModelPtr model(make_fake_model(kVocab, kCtx, {kVocab - 1}, &backend));
    backend->summaries = true;
    dbrx_engine_params ep = dbrx_engine_default_params();
    ep.kv_blocks = 256;
    EnginePtr e = make_engine(model.get(), ep);
    dbrx_sampling_params s = dbrx_sampling_default_params();
    s.max_tokens = 32;
    s.n_stop_ids = 0;
    s.temperature = 0.5f;
    s.top_p = 0.3f;
    std::vector<std::vector<int32_t>> prompts;
    for (int32_t i = 0; i < 4; ++i) prompts.push_back(prompt_of(5 + i, 55 + static_cast<uint64_t>(i)));
    run_together(e.get(), prompts, std::vector<dbrx_sampling_params>(prompts.size(), s), kVocab);
    EXPECT_EQ(backend->rows_summarized, 4 * 32);
    EXPECT_LT(backend->rows_fetched * 4, backend->rows_summarized) << "the nucleus was rarely proven";
}

}  // namespace
}  // namespace dbrx::testing
