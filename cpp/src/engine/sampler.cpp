#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "util/error.h"
#include "util/hash.h"

namespace dbrx {

namespace {

void check_finite(float v, const char *field) {
    if (!std::isfinite(v)) invalid_argument(std::string("sampling.") + field + " must be finite, got " + std::to_string(v));
}

// Orders by logit descending, then id ascending, so equal logits never depend on sort internals.
bool before(float la, int32_t ia, float lb, int32_t ib) { return la > lb || (la == lb && ia < ib); }

}  // namespace

void validate_sampling(const dbrx_sampling_params &p, int32_t n_vocab) {
    check_finite(p.temperature, "temperature");
    if (p.temperature < 0) invalid_argument("sampling.temperature must be >= 0, got " + std::to_string(p.temperature));
    if (p.top_k < -1) invalid_argument("sampling.top_k must be >= 0 (0 or -1 = off), got " + std::to_string(p.top_k));
    check_finite(p.top_p, "top_p");
    if (!(p.top_p > 0 && p.top_p <= 1)) invalid_argument("sampling.top_p must be in (0, 1], got " + std::to_string(p.top_p));
    check_finite(p.min_p, "min_p");
    if (p.min_p < 0 || p.min_p > 1) invalid_argument("sampling.min_p must be in [0, 1], got " + std::to_string(p.min_p));
    check_finite(p.repetition_penalty, "repetition_penalty");
    if (p.repetition_penalty <= 0)
        invalid_argument("sampling.repetition_penalty must be > 0, got " + std::to_string(p.repetition_penalty));
    check_finite(p.presence_penalty, "presence_penalty");
    check_finite(p.frequency_penalty, "frequency_penalty");
    if (p.max_tokens < 1) invalid_argument("sampling.max_tokens must be >= 1, got " + std::to_string(p.max_tokens));
    if (p.top_logprobs < 0 || p.top_logprobs > DBRX_MAX_TOP_LOGPROBS)
        invalid_argument("sampling.top_logprobs must be in [0, " + std::to_string(DBRX_MAX_TOP_LOGPROBS) + "], got " +
                         std::to_string(p.top_logprobs));
    if (p.n_stop_ids < -1 || p.n_stop_ids > DBRX_MAX_STOP_IDS)
        invalid_argument("sampling.n_stop_ids must be -1 (model eos) or in [0, " + std::to_string(DBRX_MAX_STOP_IDS) +
                         "], got " + std::to_string(p.n_stop_ids));
    for (int32_t i = 0; i < p.n_stop_ids; ++i) {
        if (p.stop_ids[i] < 0 || p.stop_ids[i] >= n_vocab)
            invalid_argument("sampling.stop_ids[" + std::to_string(i) + "] = " + std::to_string(p.stop_ids[i]) +
                             " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
    }
}

double counter_uniform(uint64_t seed, uint64_t index) {
    uint64_t bits = splitmix64(splitmix64(seed) ^ splitmix64(index + 0x632be59bd9b4e019ULL));
    return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

void Sampler::apply_penalties(const dbrx_sampling_params &p, std::span<const int32_t> prompt,
                              std::span<const int32_t> output) {
    bool repetition = p.repetition_penalty != 1.0f;
    bool additive = p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    if (!repetition && !additive) return;
    const int32_t n_vocab = static_cast<int32_t>(work_.size());
    if (out_counts_.size() != work_.size()) {
        out_counts_.assign(work_.size(), 0);
        seen_.assign(work_.size(), 0);
    }
    touched_.clear();
    auto touch = [&](int32_t t) {
        if (t < 0 || t >= n_vocab) return false;
        if (!seen_[t]) {
            seen_[t] = 1;
            touched_.push_back(t);
        }
        return true;
    };
    for (int32_t t : prompt) touch(t);
    for (int32_t t : output) {
        if (touch(t)) ++out_counts_[t];
    }
    for (int32_t t : touched_) {
        float &l = work_[t];
        if (repetition) l = l > 0 ? l / p.repetition_penalty : l * p.repetition_penalty;
        if (out_counts_[t] > 0) {
            l -= p.frequency_penalty * static_cast<float>(out_counts_[t]);
            l -= p.presence_penalty;
        }
        out_counts_[t] = 0;
        seen_[t] = 0;
    }
}

int32_t Sampler::draw(const dbrx_sampling_params &p, uint64_t seed, uint64_t index) {
    candidates_.clear();
    const float inv_t = 1.0f / p.temperature;
    float top = -std::numeric_limits<float>::infinity();
    for (size_t i = 0; i < work_.size(); ++i) {
        float l = work_[i] * inv_t;
        if (!std::isfinite(l)) continue;
        candidates_.push_back({l, static_cast<int32_t>(i)});
        top = std::max(top, l);
    }
    if (candidates_.empty()) fail(DBRX_ERR_INTERNAL, "sampler: no finite logit after temperature scaling");
    // min-p and top-k both keep a prefix of the descending order relative to the same maximum, so
    // they commute; only top-p needs the survivors sorted. Without it the draw walks them in id
    // order, which is just as deterministic and spares a sort of the whole vocabulary.
    if (p.min_p > 0) {
        const double log_min_p = std::log(static_cast<double>(p.min_p));
        std::erase_if(candidates_, [&](const Candidate &c) { return static_cast<double>(c.logit) - top < log_min_p; });
    }
    auto order = [](const Candidate &a, const Candidate &b) { return before(a.logit, a.id, b.logit, b.id); };
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < candidates_.size()) {
        std::nth_element(candidates_.begin(), candidates_.begin() + p.top_k, candidates_.end(), order);
        candidates_.resize(static_cast<size_t>(p.top_k));
        std::sort(candidates_.begin(), candidates_.end(), order);
    } else if (p.top_p < 1) {
        std::sort(candidates_.begin(), candidates_.end(), order);
    }

    probs_.resize(candidates_.size());
    double total = 0;
    for (size_t i = 0; i < candidates_.size(); ++i) {
        probs_[i] = std::exp(static_cast<double>(candidates_[i].logit) - top);
        total += probs_[i];
    }
    size_t keep = candidates_.size();
    if (p.top_p < 1) {
        const double target = p.top_p * total;
        double cum = 0;
        size_t n = 0;
        while (n < keep) {
            cum += probs_[n++];
            if (cum >= target) break;
        }
        keep = n;
        total = cum;
    }
    const double u = counter_uniform(seed, index) * total;
    double cum = 0;
    for (size_t i = 0; i < keep; ++i) {
        cum += probs_[i];
        if (u < cum) return candidates_[i].id;
    }
    return candidates_[keep - 1].id;  // u within rounding of the total
}

void Sampler::fill_logprobs(std::span<const float> logits, const dbrx_sampling_params &p, dbrx_token &token) {
    token.logprob = 0;
    token.n_top = 0;
    if (!p.logprobs && p.top_logprobs == 0) return;
    double top = -std::numeric_limits<double>::infinity();
    for (float l : logits)
        if (std::isfinite(l)) top = std::max(top, static_cast<double>(l));
    double sum = 0;
    for (float l : logits)
        if (std::isfinite(l)) sum += std::exp(static_cast<double>(l) - top);
    const double log_z = top + std::log(sum);
    auto logprob = [&](int32_t id) {
        float l = logits[id];
        return std::isfinite(l) ? static_cast<float>(l - log_z) : -std::numeric_limits<float>::infinity();
    };
    if (p.logprobs) token.logprob = logprob(token.id);
    if (p.top_logprobs > 0) {
        candidates_.clear();
        for (size_t i = 0; i < logits.size(); ++i) candidates_.push_back({logits[i], static_cast<int32_t>(i)});
        const size_t n = std::min(candidates_.size(), static_cast<size_t>(p.top_logprobs));
        std::partial_sort(candidates_.begin(), candidates_.begin() + n, candidates_.end(),
                          [](const Candidate &a, const Candidate &b) {
                              // NaN sorts last.
                              if (std::isnan(a.logit) != std::isnan(b.logit)) return std::isnan(b.logit);
                              return before(a.logit, a.id, b.logit, b.id);
                          });
        for (size_t i = 0; i < n; ++i) {
            token.top_ids[i] = candidates_[i].id;
            token.top_logprobs[i] = logprob(candidates_[i].id);
        }
        token.n_top = static_cast<int32_t>(n);
    }
}

dbrx_token Sampler::sample(std::span<const float> logits, const dbrx_sampling_params &p, uint64_t seed,
                           std::span<const int32_t> prompt, std::span<const int32_t> output) {
    work_.assign(logits.begin(), logits.end());
    apply_penalties(p, prompt, output);
    dbrx_token token{};
    if (p.temperature == 0) {
        int32_t best = -1;
        for (size_t i = 0; i < work_.size(); ++i) {
            float l = work_[i];
            if (std::isnan(l) || l == -std::numeric_limits<float>::infinity()) continue;
            if (best < 0 || l > work_[best]) best = static_cast<int32_t>(i);
        }
        if (best < 0) fail(DBRX_ERR_INTERNAL, "sampler: the model produced no finite logit");
        token.id = best;
    } else {
        token.id = draw(p, seed, output.size());
    }
    fill_logprobs(logits, p, token);
    return token;
}

}  // namespace dbrx
