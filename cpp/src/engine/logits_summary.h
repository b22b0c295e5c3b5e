// The reference reduction of one row of logits to a LogitsSummary (model/backend.h): what a backend
// computes on its device for forward_summarized, done on the host. The sampler reports
// log-probabilities of a full row through it, so both paths share one definition of the numbers.
#pragma once

#include <span>
#include <vector>

#include "model/backend.h"

namespace dbrx {

class LogitsSummarizer {
public:
    // Sums in id order (so log-probabilities from a full row are bitwise those of the summary).
    void summarize(std::span<const float> row, const LogitsNeed &need, LogitsSummary &out);

private:
    struct Entry {
        float logit;
        int32_t id;
    };
    std::vector<Entry> entries_;
};

}  // namespace dbrx
