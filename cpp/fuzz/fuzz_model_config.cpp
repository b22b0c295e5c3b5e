// libFuzzer: parse_model_config on arbitrary bytes. The input is config.json, optionally followed
// by a NUL byte and generation_config.json (raw NUL is never valid JSON, so nothing is lost).
#include <cstdint>
#include <cstdlib>
#include <string>

#include "io/model_config.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const std::string input(reinterpret_cast<const char *>(data), size);
    const size_t nul = input.find('\0');
    const std::string config = input.substr(0, nul);
    const std::string generation = nul == std::string::npos ? "" : input.substr(nul + 1);
    dbrx::ModelConfig c;
    try {
        c = dbrx::parse_model_config(config, generation, "fuzz");
    } catch (const dbrx::Error &e) {
        if (e.status() != DBRX_ERR_BAD_CHECKPOINT && e.status() != DBRX_ERR_UNSUPPORTED) std::abort();
        return 0;
    }
    // Accepted: the invariants the model code relies on.
    if (c.d_model <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.n_layers <= 0 || c.vocab_size <= 0) std::abort();
    if (c.head_dim * c.n_heads != c.d_model || c.n_heads % c.n_kv_heads != 0) std::abort();
    if (c.top_k < 1 || c.top_k > c.n_experts || c.ffn_hidden <= 0 || c.max_seq_len <= 0) std::abort();
    if (!(c.rope_theta > 0) || (c.clip_qkv && !(*c.clip_qkv > 0)) || (c.moe_norm_p && !(*c.moe_norm_p > 0))) std::abort();
    if (c.qkv_rows() <= 0) std::abort();
    for (int32_t id : c.eos_ids)
        if (id < 0 || id >= c.vocab_size) std::abort();
    return 0;
}
