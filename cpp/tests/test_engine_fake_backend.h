// A deterministic stand-in for a model, for testing the engine without weights. Its "K/V" at
// position p is a hash chained from the value stored at p - 1 (read back through the block table)
// and token p, and its logits are a hash of the whole stored chain. So a wrong block table, a
// missed or misplaced KV write, or a stale block shows up as wrong logits, while a correct engine
// gets logits that depend only on the token history, whatever the batch or chunking.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <chrono>
#include <vector>

#include "api/handles.h"
#include "engine/logits_summary.h"
#include "model/backend.h"
#include "util/error.h"
#include "util/hash.h"

namespace dbrx::testing {

// len reproducible token ids splitmix64(salt * mul + i) % modulo: the engine tests' prompts.
inline std::vector<int32_t> hashed_prompt(int32_t len, uint64_t salt, uint64_t mul, int32_t modulo) {
    std::vector<int32_t> p;
    for (int32_t i = 0; i < len; ++i) p.push_back(static_cast<int32_t>(splitmix64(salt * mul + i) % modulo));
    return p;
}

// KV value at position p given the value at p - 1 (0 before the first token).
inline uint64_t fake_kv(uint64_t previous, int32_t token, int32_t pos) {
    return splitmix64(previous ^ splitmix64(static_cast<uint64_t>(token) * 1000003ULL + static_cast<uint64_t>(pos))) | 1;
}

// Logits in [-3, 3) from the KV value of the last position.
inline void fake_logits(uint64_t last_kv, std::span<float> out) {
    for (size_t v = 0; v < out.size(); ++v)
        out[v] = static_cast<float>(splitmix64(last_kv ^ (v * 0x632be59bd9b4e019ULL)) >> 40) * 0x1.0p-24f * 6.0f - 3.0f;
}

// What the engine must produce: last-position logits of a token history, computed without paging.
inline std::vector<float> fake_reference_logits(std::span<const int32_t> tokens, int32_t n_vocab) {
    uint64_t kv = 0;
    for (size_t p = 0; p < tokens.size(); ++p) kv = fake_kv(kv, tokens[p], static_cast<int32_t>(p));
    std::vector<float> out(static_cast<size_t>(n_vocab));
    fake_logits(kv, out);
    return out;
}

inline std::vector<int32_t> fake_reference_greedy(std::vector<int32_t> tokens, int32_t n_vocab, int32_t n) {
    std::vector<int32_t> out;
    for (int32_t i = 0; i < n; ++i) {
        std::vector<float> l = fake_reference_logits(tokens, n_vocab);
        int32_t best = 0;
        for (int32_t v = 1; v < n_vocab; ++v)
            if (l[v] > l[best]) best = v;
        out.push_back(best);
        tokens.push_back(best);
    }
    return out;
}

class FakeKvPool : public KvPool {
public:
    FakeKvPool(int32_t n_blocks, int32_t block_size)
        : n_blocks_(n_blocks), block_size_(block_size), slots_(static_cast<size_t>(n_blocks) * block_size, 0) {}
    int32_t n_blocks() const override { return n_blocks_; }
    int32_t block_size() const override { return block_size_; }
    uint64_t &slot(std::span<const int32_t> blocks, int32_t pos) {
        const size_t b = static_cast<size_t>(pos / block_size_);
        if (b >= blocks.size()) fail(DBRX_ERR_INTERNAL, "fake backend: block table too short for position " + std::to_string(pos));
        const int32_t block = blocks[b];
        if (block < 0 || block >= n_blocks_) fail(DBRX_ERR_INTERNAL, "fake backend: block id out of range");
        return slots_[static_cast<size_t>(block) * block_size_ + pos % block_size_];
    }

private:
    int32_t n_blocks_;
    int32_t block_size_;
    std::vector<uint64_t> slots_;
};

class FakeBackend : public Backend {
public:
    explicit FakeBackend(int32_t n_vocab) : n_vocab_(n_vocab) {}
    std::string name() const override { return "fake"; }
    int64_t kv_bytes_per_block(int32_t block_size) const override { return int64_t{8} * block_size; }
    int64_t kv_memory_available() const override { return int64_t{1} << 20; }
    std::unique_ptr<KvPool> create_kv_pool(int32_t n_blocks, int32_t block_size) override {
        return std::make_unique<FakeKvPool>(n_blocks, block_size);
    }
    void forward(KvPool &pool_base, std::span<const SeqStep> batch, float *logits) override {
        std::lock_guard lock(mu_);
        if (step_delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(step_delay_us.load()));
        auto &pool = dynamic_cast<FakeKvPool &>(pool_base);
        forwards.fetch_add(1);
        if (log_batches) {
            std::vector<std::pair<int32_t, int32_t>> shape;
            for (const SeqStep &s : batch) shape.emplace_back(s.pos0, static_cast<int32_t>(s.tokens.size()));
            batch_log.push_back(std::move(shape));
        }
        for (const SeqStep &s : batch) rows_forwarded.fetch_add(s.want_logits ? 1 : 0);
        size_t row = 0;
        for (const SeqStep &s : batch) {
            for (size_t i = 0; i < s.tokens.size(); ++i) {
                if (fail_token && s.tokens[i] == *fail_token) fail(DBRX_ERR_INTERNAL, "fake backend: injected failure");
                if (fatal_token && s.tokens[i] == *fatal_token) fail(DBRX_ERR_ENGINE_DEAD, "fake backend: injected device loss");
                const int32_t p = s.pos0 + static_cast<int32_t>(i);
                const uint64_t previous = p == 0 ? 0 : pool.slot(s.blocks, p - 1);
                if (p > 0 && previous == 0) fail(DBRX_ERR_INTERNAL, "fake backend: KV of position " + std::to_string(p - 1) + " was never written");
                pool.slot(s.blocks, p) = fake_kv(previous, s.tokens[i], p);
            }
            if (s.want_logits) {
                const int32_t last = s.pos0 + static_cast<int32_t>(s.tokens.size()) - 1;
                std::span<float> row_out(logits + row * n_vocab_, static_cast<size_t>(n_vocab_));
                fake_logits(pool.slot(s.blocks, last), row_out);
                if (nan_token && last < 3 && s.tokens.back() == *nan_token) std::fill(row_out.begin(), row_out.end(), std::nanf(""));
                ++row;
            }
        }
    }

    // With summaries on, forward_summarized keeps the step's rows and summarises them with the CPU
    // reference summariser, as a device backend would on its device.
    bool forward_summarized(KvPool &pool, std::span<const SeqStep> batch, std::span<const LogitsNeed> needs,
                            std::span<LogitsSummary> out) override {
        if (!summaries) return false;
        const size_t rows = static_cast<size_t>(std::count_if(batch.begin(), batch.end(), [](const SeqStep &s) { return s.want_logits; }));
        if (needs.size() != rows || out.size() != rows) fail(DBRX_ERR_INTERNAL, "fake backend: needs/out do not match the output rows");
        kept_.assign(rows * static_cast<size_t>(n_vocab_), 0.0f);
        forward(pool, batch, kept_.data());
        for (size_t i = 0; i < rows; ++i)
            summarizer_.summarize(std::span<const float>(kept_).subspan(i * n_vocab_, static_cast<size_t>(n_vocab_)), needs[i], out[i]);
        rows_summarized.fetch_add(static_cast<int64_t>(rows));
        return true;
    }
    void fetch_logits_row(int32_t i, float *dst) override {
        if (!summaries || i < 0 || static_cast<size_t>(i + 1) * n_vocab_ > kept_.size())
            fail(DBRX_ERR_INTERNAL, "fake backend: fetch_logits_row(" + std::to_string(i) + ") outside the last step");
        std::copy_n(kept_.begin() + static_cast<std::ptrdiff_t>(i) * n_vocab_, n_vocab_, dst);
        rows_fetched.fetch_add(1);
    }

    bool summaries = false;  // set before creating an engine
    std::atomic<int64_t> rows_summarized{0}, rows_fetched{0}, rows_forwarded{0};  // forwarded: every output row
    std::atomic<int64_t> forwards{0};
    std::optional<int32_t> fail_token;  // set before submitting
    std::optional<int32_t> fatal_token; // throws ENGINE_DEAD
    std::optional<int32_t> nan_token;   // a sequence of <= 3 tokens ending in it gets all-NaN logits
    std::atomic<int32_t> step_delay_us{0};
    bool log_batches = false;  // record (pos0, n_new) of every sequence of every step
    std::vector<std::vector<std::pair<int32_t, int32_t>>> batch_log;  // read after the engine is idle  // makes steps slow enough to cancel mid-request

private:
    int32_t n_vocab_;
    std::mutex mu_;
    std::vector<float> kept_;  // the last summarised step's rows
    LogitsSummarizer summarizer_;
};

// A C API model handle around a FakeBackend (no checkpoint).
inline dbrx_model *make_fake_model(int32_t n_vocab, int32_t max_seq_len, std::vector<int32_t> eos_ids, FakeBackend **backend_out = nullptr) {
    auto model = std::make_unique<dbrx_model>();
    auto backend = std::make_unique<FakeBackend>(n_vocab);
    if (backend_out) *backend_out = backend.get();
    model->backend = std::move(backend);
    model->config.vocab_size = n_vocab;
    model->config.max_seq_len = max_seq_len;
    model->config.eos_ids = std::move(eos_ids);
    return model.release();
}

}  // namespace dbrx::testing
