#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "util/error.h"
#include "util/hash.h"

namespace dbrx {

static_assert(DBRX_MAX_TOP_LOGPROBS <= kMaxLogitsCandidates, "a summary lists every reported alternative");

namespace {

void check_finite(float v, const char *field) {
    if (!std::isfinite(v)) invalid_argument(std::string("sampling.") + field + " must be finite, got " + std::to_string(v));
}

// Orders by logit descending, then id ascending, so equal logits never depend on sort internals.
bool before(float la, int32_t ia, float lb, int32_t ib) { return la > lb || (la == lb && ia < ib); }

bool survives_min_p(float scaled, double top, double log_min_p) {
    return !(static_cast<double>(scaled) - top < log_min_p);
}

bool has_penalties(const dbrx_sampling_params &p) {
    return p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
}

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
    if (!has_penalties(p)) return;
    const bool repetition = p.repetition_penalty != 1.0f;
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

LogitsNeed logits_need(const dbrx_sampling_params &p) {
    LogitsNeed need;
    need.temperature = p.temperature;
    if (has_penalties(p)) return need;  // penalties reorder the row: only the full row will do
    const bool filtered = (p.top_k > 0 && p.top_k < kMaxLogitsCandidates) || p.top_p < 1 || p.min_p > 0;
    if (p.temperature > 0 && !filtered) return need;  // a draw over the whole vocabulary
    // Greedy needs the argmax and the reported alternatives; a draw needs every token the filters
    // might keep, so ask for the most (the spare candidates also prove where the top-k set ends).
    need.top_n = p.temperature == 0 ? std::max<int32_t>(1, p.top_logprobs) : kMaxLogitsCandidates;
    return need;
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
        std::erase_if(candidates_, [&](const Candidate &c) { return !survives_min_p(c.logit, top, log_min_p); });
    }
    auto order = [](const Candidate &a, const Candidate &b) { return before(a.logit, a.id, b.logit, b.id); };
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < candidates_.size()) {
        std::nth_element(candidates_.begin(), candidates_.begin() + p.top_k, candidates_.end(), order);
        candidates_.resize(static_cast<size_t>(p.top_k));
        std::sort(candidates_.begin(), candidates_.end(), order);
    } else if (p.top_p < 1) {
        std::sort(candidates_.begin(), candidates_.end(), order);
    }
    return finish_draw(p, top, counter_uniform(seed, index), std::nullopt);
}

// The summary's candidates C are the row's first n by raw logit. Scaling by 1/T keeps that order
// but may merge neighbours into ties, which the draw breaks by id; so C sorted by (scaled logit, id)
// is the start of the draw's order only up to the entries strictly above C's last scaled value
// (a token outside C may tie with that value and have a lower id): the "proven" prefix. From it:
//  - min-p survivors are a prefix of that order: known once one proven entry fails;
//  - top-k keeps the first k of them: known when k < the proven prefix;
//  - top-p over survivors that are not all known cuts where the running sum crosses top_p times
//    their total, which the summary's sum_exp_t bounds (erased tokens weigh < min_p each).
int32_t Sampler::draw_summary(const LogitsSummary &s, const dbrx_sampling_params &p, uint64_t seed, uint64_t index) {
    const float inv_t = 1.0f / p.temperature;
    const float top = s.logits[0] * inv_t;  // the largest scaled logit: scaling is monotone
    if (!std::isfinite(top)) return -1;
    candidates_.clear();
    int32_t finite_in_c = 0;
    for (int32_t i = 0; i < s.n_candidates; ++i) {
        if (!std::isfinite(s.logits[i])) continue;  // -inf, after every finite logit
        ++finite_in_c;
        const float l = s.logits[i] * inv_t;
        if (std::isfinite(l)) candidates_.push_back({l, s.ids[i]});
    }
    const bool complete = finite_in_c == s.n_finite;  // C holds every finite logit
    auto order = [](const Candidate &a, const Candidate &b) { return before(a.logit, a.id, b.logit, b.id); };
    std::sort(candidates_.begin(), candidates_.end(), order);
    size_t proven = candidates_.size();
    if (!complete) {
        const float last = s.logits[s.n_candidates - 1] * inv_t;
        proven = static_cast<size_t>(std::count_if(candidates_.begin(), candidates_.end(),
                                                   [&](const Candidate &c) { return c.logit > last; }));
    }
    size_t survivors = proven;
    bool known = complete;
    if (p.min_p > 0) {
        const double log_min_p = std::log(static_cast<double>(p.min_p));
        survivors = static_cast<size_t>(
            std::find_if(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(proven),
                         [&](const Candidate &c) { return !survives_min_p(c.logit, top, log_min_p); }) -
            candidates_.begin());
        known = known || survivors < proven;
    }
    const size_t top_k = p.top_k > 0 ? static_cast<size_t>(p.top_k) : 0;
    std::optional<TotalBounds> bounds;
    if (top_k > 0 && top_k < (known ? survivors : proven)) {
        candidates_.resize(top_k);
    } else if (known) {
        candidates_.resize(survivors);
        if (p.top_p >= 1) std::sort(candidates_.begin(), candidates_.end(), [](const Candidate &a, const Candidate &b) {
            return a.id < b.id;
        });
    } else {
        if (p.top_p >= 1 || top_k > 0) return -1;  // a draw over survivors the summary does not list
        candidates_.resize(proven);
        // kSumSlack covers the rounding of sums of up to 2^20 terms in any order and of exp().
        constexpr double kSumSlack = 1e-9;
        const double outside = static_cast<double>(s.n_finite) - static_cast<double>(proven);
        double lo = s.sum_exp_t * (1 - kSumSlack);
        if (p.min_p > 0) lo -= outside * static_cast<double>(p.min_p) * (1 + kSumSlack);
        bounds = TotalBounds{lo, s.sum_exp_t * (1 + kSumSlack)};
    }
    return finish_draw(p, top, counter_uniform(seed, index), bounds);
}

int32_t Sampler::finish_draw(const dbrx_sampling_params &p, double top, double u01,
                             const std::optional<TotalBounds> &bounds) {
    probs_.resize(candidates_.size());
    double total = 0;
    for (size_t i = 0; i < candidates_.size(); ++i) {
        probs_[i] = std::exp(static_cast<double>(candidates_[i].logit) - top);
        total += probs_[i];
    }
    Cut cut{candidates_.size(), total};
    if (p.top_p < 1) {
        // The survivors listed sum to `total`; unlisted ones only add to it.
        const double lo = bounds ? std::max(total, bounds->lo) : total;
        const double hi = bounds ? bounds->hi : total;
        const std::optional<Cut> c = cut_top_p(p.top_p * lo, p.top_p * hi, !bounds);
        if (!c) return -1;
        cut = *c;
    }
    const double u = u01 * cut.total;
    double cum = 0;
    for (size_t i = 0; i < cut.keep; ++i) {
        cum += probs_[i];
        if (u < cum) return candidates_[i].id;
    }
    return candidates_[cut.keep - 1].id;  // u within rounding of the total
}

// The nucleus: the shortest prefix whose running sum reaches the target. With the target only
// known to lie in [target_lo, target_hi], the prefix is the same for every target in it when the
// sum first reaches target_hi one step after it was still below target_lo.
std::optional<Sampler::Cut> Sampler::cut_top_p(double target_lo, double target_hi, bool complete) const {
    double cum = 0;
    size_t n = 0;
    while (n < probs_.size()) {
        const double before_step = cum;
        cum += probs_[n++];
        if (cum >= target_hi) {
            if (before_step < target_lo) return Cut{n, cum};
            return std::nullopt;
        }
    }
    if (complete) return Cut{n, cum};
    return std::nullopt;
}

void Sampler::fill_logprobs(const LogitsSummary &s, float token_logit, const dbrx_sampling_params &p,
                            dbrx_token &token) const {
    token.logprob = 0;
    token.n_top = 0;
    if (!p.logprobs && p.top_logprobs == 0) return;
    const double log_z = static_cast<double>(s.max_logit) + std::log(s.sum_exp);
    auto logprob = [&](float l) {
        return std::isfinite(l) ? static_cast<float>(l - log_z) : -std::numeric_limits<float>::infinity();
    };
    if (p.logprobs) token.logprob = logprob(token_logit);
    const int32_t n = std::min(s.n_candidates, p.top_logprobs);
    for (int32_t i = 0; i < n; ++i) {
        token.top_ids[i] = s.ids[i];
        token.top_logprobs[i] = logprob(s.logits[i]);
    }
    token.n_top = n;
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
    if (p.logprobs || p.top_logprobs > 0) {
        summarizer_.summarize(logits, LogitsNeed{p.top_logprobs, 0.0f}, summary_);
        fill_logprobs(summary_, logits[static_cast<size_t>(token.id)], p, token);
    }
    return token;
}

std::optional<dbrx_token> Sampler::sample_summary(const LogitsSummary &s, int32_t n_vocab,
                                                  const dbrx_sampling_params &p, uint64_t seed, uint64_t index) {
    // NaN and +inf follow special rules in sample() (and no finite logit is an error there).
    if (has_penalties(p) || s.n_nan_or_pos_inf != 0 || s.n_finite == 0 || s.n_candidates < 1) return std::nullopt;
    if (s.n_candidates < std::min(p.top_logprobs, n_vocab)) return std::nullopt;
    dbrx_token token{};
    if (p.temperature == 0) {
        token.id = s.ids[0];
    } else {
        token.id = draw_summary(s, p, seed, index);
        if (token.id < 0) return std::nullopt;
    }
    const int32_t *at = std::find(s.ids, s.ids + s.n_candidates, token.id);
    fill_logprobs(s, s.logits[at - s.ids], p, token);
    return token;
}

}  // namespace dbrx
