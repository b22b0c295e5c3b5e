// Per-request token sampling: penalties, temperature, min-p / top-k / top-p, a seeded draw and
// log-probabilities. The random draw for the i-th generated token depends only on (seed, i), so a
// request's output does not depend on what else is in the batch, nor on being preempted and
// recomputed.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "dbrx/dbrx.h"

namespace dbrx {

// Throws INVALID_ARGUMENT naming the first out-of-range field (NaN and infinities included).
// n_vocab bounds the stop ids.
void validate_sampling(const dbrx_sampling_params &params, int32_t n_vocab);

// A uniform double in [0, 1) that depends only on (seed, index).
double counter_uniform(uint64_t seed, uint64_t index);

class Sampler {
public:
    // Picks the next token from one row of raw model logits.
    //  - repetition_penalty (vLLM): over prompt and output tokens, a positive logit is divided by it,
    //    a negative one multiplied;
    //  - frequency / presence penalties (OpenAI, vLLM): over output tokens, logit -= f * count + p;
    //  - temperature 0: argmax (lowest id on ties); otherwise logits / T, then min-p, top-k, top-p
    //    and a draw with counter_uniform(seed, output.size()).
    // The reported logprob / top logprobs are log-softmax of the raw logits (vLLM's default).
    // Throws INTERNAL when no logit is finite.
    dbrx_token sample(std::span<const float> logits, const dbrx_sampling_params &params, uint64_t seed,
                      std::span<const int32_t> prompt, std::span<const int32_t> output);

private:
    struct Candidate {
        float logit;
        int32_t id;
    };
    void apply_penalties(const dbrx_sampling_params &params, std::span<const int32_t> prompt,
                         std::span<const int32_t> output);
    int32_t draw(const dbrx_sampling_params &params, uint64_t seed, uint64_t index);
    void fill_logprobs(std::span<const float> logits, const dbrx_sampling_params &params, dbrx_token &token);

    std::vector<float> work_;             // penalised logits
    std::vector<Candidate> candidates_;
    std::vector<double> probs_;
    std::vector<int32_t> out_counts_;     // per-vocab occurrences in the output
    std::vector<uint8_t> seen_;           // per-vocab: occurs in prompt or output
    std::vector<int32_t> touched_;        // ids whose counts_ are non-zero
};

}  // namespace dbrx
