// Throughput of the CPU backend on tiny-dbrx (prints tokens/s): a 130-token prefill in one step and
// greedy decode one token per step through the KV cache, plus decode of 8 sequences per step.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "model/backend.h"

namespace dbrx {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(CpuPerf, TinyDbrxPrefillAndDecodeTokensPerSecond) {
    auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx");
    auto backend = make_cpu_backend(*ckpt, BackendOptions{});
    const int32_t vocab = ckpt->config().vocab_size, bs = 16, prompt_len = 130, decode_steps = 64, n_seqs = 8;
    const int32_t per_seq_blocks = (prompt_len + decode_steps + bs - 1) / bs;
    auto pool = backend->create_kv_pool(per_seq_blocks * n_seqs, bs);
    std::vector<std::vector<int32_t>> tables(n_seqs, std::vector<int32_t>(per_seq_blocks));
    for (int32_t s = 0; s < n_seqs; ++s) std::iota(tables[s].begin(), tables[s].end(), s * per_seq_blocks);
    std::vector<int32_t> prompt(prompt_len);
    for (int32_t i = 0; i < prompt_len; ++i) prompt[i] = (i * 37 + 11) % vocab;
    std::vector<float> logits(static_cast<size_t>(vocab) * n_seqs);

    // Prefill every sequence (timed: the first one alone, then all 8 in one step).
    auto t0 = std::chrono::steady_clock::now();
    SeqStep first{prompt, 0, tables[0], true};
    backend->forward(*pool, std::span<const SeqStep>(&first, 1), logits.data());
    const double prefill_s = seconds_since(t0);
    std::vector<SeqStep> steps(n_seqs - 1);
    for (int32_t s = 1; s < n_seqs; ++s) steps[s - 1] = {prompt, 0, tables[s], true};
    t0 = std::chrono::steady_clock::now();
    backend->forward(*pool, steps, logits.data() + vocab);
    const double prefill_batch_s = seconds_since(t0);

    // Decode sequence 0 alone, then all 8 together.
    std::vector<int32_t> next(n_seqs);
    auto pick = [&](int32_t row) {
        const float *l = logits.data() + static_cast<size_t>(row) * vocab;
        return static_cast<int32_t>(std::max_element(l, l + vocab) - l);
    };
    t0 = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < decode_steps / 2; ++i) {
        next[0] = pick(0);
        SeqStep step{std::span<const int32_t>(&next[0], 1), prompt_len + i, tables[0], true};
        backend->forward(*pool, std::span<const SeqStep>(&step, 1), logits.data());
    }
    const double decode_s = seconds_since(t0);
    for (int32_t s = 1; s < n_seqs; ++s) next[s] = pick(s);
    t0 = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < decode_steps / 2; ++i) {
        std::vector<SeqStep> batch(n_seqs - 1);
        for (int32_t s = 1; s < n_seqs; ++s)
            batch[s - 1] = {std::span<const int32_t>(&next[s], 1), prompt_len + i, tables[s], true};
        backend->forward(*pool, batch, logits.data() + vocab);
        for (int32_t s = 1; s < n_seqs; ++s) next[s] = pick(s);
    }
    const double decode_batch_s = seconds_since(t0);
    for (float v : logits) ASSERT_TRUE(std::isfinite(v));

    std::printf("[ cpu tiny-dbrx ] prefill %d tokens: %.0f tok/s; %d prompts in one step: %.0f tok/s\n", prompt_len,
                prompt_len / prefill_s, n_seqs - 1, (n_seqs - 1) * prompt_len / prefill_batch_s);
    std::printf("[ cpu tiny-dbrx ] decode 1 sequence: %.0f tok/s; %d sequences per step: %.0f tok/s\n",
                decode_steps / 2 / decode_s, n_seqs - 1, (n_seqs - 1) * (decode_steps / 2) / decode_batch_s);
}

}  // namespace
}  // namespace dbrx
