// Per-request token sampling: penalties, temperature, min-p / top-k / top-p, a seeded draw and
// log-probabilities. The random draw for the i-th generated token depends only on (seed, i), so a
// request's output does not depend on what else is in the batch, nor on being preempted and
// recomputed. A token comes either from the full row of logits or, when that provably gives the
// same token and numbers, from a device-side summary of the row (model/backend.h).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "dbrx/dbrx.h"
#include "engine/logits_summary.h"
#include "model/backend.h"

namespace dbrx {

// Throws INVALID_ARGUMENT naming the first out-of-range field (NaN and infinities included).
// n_vocab bounds the stop ids.
void validate_sampling(const dbrx_sampling_params &params, int32_t n_vocab);

// A uniform double in [0, 1) that depends only on (seed, index).
double counter_uniform(uint64_t seed, uint64_t index);

// What a summary must hold for sample_summary to have a chance. top_n 0: only the full row will do
// (penalties, or a draw that no filter narrows below the whole vocabulary).
LogitsNeed logits_need(const dbrx_sampling_params &params);

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

    // The token sample() would pick from the row of n_vocab logits that `summary` describes, with
    // `index` = output.size(), when the summary proves it (no penalties; the candidates hold every
    // token the filters can keep, or bound the rest tightly enough); nullopt otherwise. The
    // logprobs are sample()'s up to the rounding of the summary's sums.
    std::optional<dbrx_token> sample_summary(const LogitsSummary &summary, int32_t n_vocab,
                                             const dbrx_sampling_params &params, uint64_t seed, uint64_t index);

private:
    struct Candidate {
        float logit;
        int32_t id;
    };
    struct Cut {
        size_t keep;
        double total;
    };
    // Bounds on the sum of probs over every min-p survivor when candidates_ holds only a prefix of them.
    struct TotalBounds {
        double lo, hi;
    };
    void apply_penalties(const dbrx_sampling_params &params, std::span<const int32_t> prompt,
                         std::span<const int32_t> output);
    int32_t draw(const dbrx_sampling_params &params, uint64_t seed, uint64_t index);
    // -1 when the summary cannot prove the draw.
    int32_t draw_summary(const LogitsSummary &summary, const dbrx_sampling_params &params, uint64_t seed,
                         uint64_t index);
    // The common end of both draws: candidates_ holds the survivors of min-p and top-k in the order
    // the draw walks them. Returns -1 when `bounds` leave the top-p cut unproven.
    int32_t finish_draw(const dbrx_sampling_params &params, double top, double u01,
                        const std::optional<TotalBounds> &bounds);
    std::optional<Cut> cut_top_p(double target_lo, double target_hi, bool complete) const;
    void fill_logprobs(const LogitsSummary &summary, float token_logit, const dbrx_sampling_params &params,
                       dbrx_token &token) const;

    std::vector<float> work_;             // penalised logits
    std::vector<Candidate> candidates_;
    std::vector<double> probs_;
    std::vector<int32_t> out_counts_;     // per-vocab occurrences in the output
    std::vector<uint8_t> seen_;           // per-vocab: occurs in prompt or output
    std::vector<int32_t> touched_;        // ids whose counts_ are non-zero
    LogitsSummarizer summarizer_;
    LogitsSummary summary_;               // of the raw row, for sample()'s logprobs
};

}  // namespace dbrx
