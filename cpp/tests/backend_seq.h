// Driving one sequence through a Backend in tests: its block table, how much of it is cached, and
// prefill in chunks that returns the last logits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "model/backend.h"

namespace dbrx::testing {

// One sequence in a pool: its block table and how many positions are cached.
struct Seq {
    std::vector<int32_t> blocks;
    int32_t cached = 0;
};

// Block ids first, first + 1, ..., first + count - 1.
inline std::vector<int32_t> sequential_blocks(int32_t first, int32_t count) {
    std::vector<int32_t> b(count);
    std::iota(b.begin(), b.end(), first);
    return b;
}

// Feeds `tokens` to the sequence in chunks of `chunk` (0 = all at once) and returns the last logits.
inline std::vector<float> prefill(Backend &be, KvPool &pool, Seq &seq, const std::vector<int32_t> &tokens,
                                  size_t chunk, int32_t vocab) {
    std::vector<float> logits(vocab);
    if (chunk == 0) chunk = tokens.size();
    for (size_t i = 0; i < tokens.size(); i += chunk) {
        const size_t n = std::min(chunk, tokens.size() - i);
        SeqStep step{std::span<const int32_t>(tokens.data() + i, n), seq.cached, seq.blocks, i + n == tokens.size()};
        be.forward(pool, std::span<const SeqStep>(&step, 1), logits.data());
        seq.cached += static_cast<int32_t>(n);
    }
    return logits;
}

}  // namespace dbrx::testing
