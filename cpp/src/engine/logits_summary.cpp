#include "engine/logits_summary.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "util/error.h"

namespace dbrx {

void LogitsSummarizer::summarize(std::span<const float> row, const LogitsNeed &need, LogitsSummary &out) {
    if (need.top_n < 0 || need.top_n > kMaxLogitsCandidates)
        invalid_argument("logits summary: top_n must be in [0, " + std::to_string(kMaxLogitsCandidates) + "], got " +
                         std::to_string(need.top_n));
    double top = -std::numeric_limits<double>::infinity();
    out.n_finite = 0;
    out.n_nan_or_pos_inf = 0;
    for (float l : row) {
        if (std::isfinite(l)) {
            ++out.n_finite;
            top = std::max(top, static_cast<double>(l));
        } else if (!(l < 0)) {
            ++out.n_nan_or_pos_inf;
        }
    }
    double sum = 0;
    for (float l : row)
        if (std::isfinite(l)) sum += std::exp(static_cast<double>(l) - top);
    out.max_logit = static_cast<float>(top);
    out.sum_exp = sum;

    out.sum_exp_t = 0;
    if (need.temperature > 0) {
        const float inv_t = 1.0f / need.temperature;
        double top_t = -std::numeric_limits<double>::infinity();
        for (float l : row) {
            const float s = l * inv_t;
            if (std::isfinite(s)) top_t = std::max(top_t, static_cast<double>(s));
        }
        for (float l : row) {
            const float s = l * inv_t;
            if (std::isfinite(s)) out.sum_exp_t += std::exp(static_cast<double>(s) - top_t);
        }
    }

    const size_t n = std::min(row.size(), static_cast<size_t>(need.top_n));
    out.n_candidates = static_cast<int32_t>(n);
    if (n == 0) return;
    entries_.clear();
    for (size_t i = 0; i < row.size(); ++i) entries_.push_back({row[i], static_cast<int32_t>(i)});
    std::partial_sort(entries_.begin(), entries_.begin() + static_cast<std::ptrdiff_t>(n), entries_.end(),
                      [](const Entry &a, const Entry &b) {
                          // NaN last, by id among themselves.
                          if (std::isnan(a.logit) || std::isnan(b.logit))
                              return std::isnan(a.logit) == std::isnan(b.logit) ? a.id < b.id : std::isnan(b.logit);
                          return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
                      });
    for (size_t i = 0; i < n; ++i) {
        out.ids[i] = entries_[i].id;
        out.logits[i] = entries_[i].logit;
    }
}

}  // namespace dbrx
