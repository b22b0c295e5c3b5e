#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "engine/engine.h"
#include "util/error.h"

namespace dbrx {

namespace {
void at_least(int64_t value, int64_t min, const char *field) {
    if (value < min)
        invalid_argument(std::string("engine.") + field + " must be >= " + std::to_string(min) + ", got " +
                         std::to_string(value));
}
}  // namespace

EngineOptions resolve_engine_options(const dbrx_engine_params &p, const Backend &backend, int32_t n_vocab,
                                     int32_t model_max_ctx, std::vector<int32_t> eos_ids) {
    at_least(p.block_size, 1, "block_size");
    at_least(p.kv_blocks, 0, "kv_blocks");
    at_least(p.kv_cache_bytes, 0, "kv_cache_bytes");
    at_least(p.max_batch_tokens, 1, "max_batch_tokens");
    at_least(p.max_running, 1, "max_running");
    at_least(p.max_waiting, 1, "max_waiting");
    at_least(p.max_ctx, 0, "max_ctx");
    if (p.max_ctx > model_max_ctx)
        invalid_argument("engine.max_ctx = " + std::to_string(p.max_ctx) + " exceeds the model's max_seq_len " +
                         std::to_string(model_max_ctx));

    EngineOptions o;
    o.n_vocab = n_vocab;
    o.max_ctx = p.max_ctx > 0 ? p.max_ctx : model_max_ctx;
    o.eos_ids = std::move(eos_ids);
    o.block_size = p.block_size;
    o.max_batch_tokens = p.max_batch_tokens;
    o.max_running = p.max_running;
    o.max_waiting = p.max_waiting;
    o.enable_prefix_cache = p.enable_prefix_cache;

    const int64_t per_block = backend.kv_bytes_per_block(p.block_size);
    if (per_block <= 0) fail(DBRX_ERR_INTERNAL, "backend " + backend.name() + " reports a KV block size of 0 bytes");
    int64_t n_blocks = 0;
    if (p.kv_blocks > 0) {
        n_blocks = p.kv_blocks;
    } else if (p.kv_cache_bytes > 0) {
        n_blocks = p.kv_cache_bytes / per_block;
        if (n_blocks == 0)
            invalid_argument("engine.kv_cache_bytes = " + std::to_string(p.kv_cache_bytes) +
                             " holds no KV block (one block of " + std::to_string(p.block_size) + " tokens takes " +
                             std::to_string(per_block) + " bytes)");
    } else {
        if (!std::isfinite(p.kv_cache_fraction) || p.kv_cache_fraction <= 0 || p.kv_cache_fraction > 1)
            invalid_argument("engine.kv_cache_fraction must be in (0, 1] when kv_blocks and kv_cache_bytes are 0, got " +
                             std::to_string(p.kv_cache_fraction));
        const double bytes = static_cast<double>(backend.kv_memory_available()) * p.kv_cache_fraction;
        n_blocks = static_cast<int64_t>(bytes / static_cast<double>(per_block));
        if (n_blocks == 0)
            fail(DBRX_ERR_OUT_OF_MEMORY, "no memory for a KV block: " + std::to_string(p.kv_cache_fraction) + " of " +
                                             std::to_string(backend.kv_memory_available()) + " bytes available on " +
                                             backend.name() + " is less than one block (" + std::to_string(per_block) +
                                             " bytes)");
    }
    o.n_blocks = static_cast<int32_t>(std::min<int64_t>(n_blocks, std::numeric_limits<int32_t>::max() / 2));
    return o;
}

}  // namespace dbrx
