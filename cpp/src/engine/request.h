// One generation request as the engine tracks it. The scheduler fields are touched only by the
// engine's worker thread; the rest is shared with callers and guarded by the engine's mutex.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "dbrx/dbrx.h"

namespace dbrx {

struct Request {
    uint64_t id = 0;
    uint64_t arrival = 0;              // FCFS order
    std::vector<int32_t> tokens;       // prompt, then every generated id
    int32_t n_prompt = 0;
    dbrx_sampling_params sampling{};
    uint64_t seed = 0;
    std::vector<int32_t> stop_ids;
    std::vector<uint64_t> prompt_block_keys;  // hash-chain key of each full prompt block

    // Scheduler state (worker thread).
    std::vector<int32_t> blocks;       // block table
    int32_t n_computed = 0;            // tokens whose K/V is in the pool
    int32_t n_registered = 0;          // leading blocks already offered to the prefix cache
    bool admitted = false;             // in the running batch
    bool summary_missed = false;       // the last summarised step could not sample from its summary

    // Shared state (engine mutex).
    std::vector<dbrx_token> output;
    size_t n_polled = 0;
    dbrx_finish_reason finish = DBRX_FINISH_NONE;
    std::string error;
    bool cancel_requested = false;
    bool released = false;
    std::vector<float> prompt_logits;  // when sampling.keep_prompt_logits, once the first token exists

    std::span<const int32_t> prompt() const { return {tokens.data(), static_cast<size_t>(n_prompt)}; }
    std::span<const int32_t> generated() const {
        return std::span<const int32_t>(tokens).subspan(static_cast<size_t>(n_prompt));
    }
};

}  // namespace dbrx
