// DBRX hyper-parameters as read from a hub config.json + generation_config.json.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dbrx {

struct ModelConfig {
    int32_t d_model = 0;
    int32_t n_heads = 0;
    int32_t n_kv_heads = 0;     // attn_config.kv_n_heads
    int32_t head_dim = 0;       // d_model / n_heads
    int32_t n_layers = 0;
    int32_t max_seq_len = 0;
    int32_t vocab_size = 0;
    std::optional<float> clip_qkv;        // attn_config.clip_qkv; nullopt = no clamp
    double rope_theta = 10000.0;          // attn_config.rope_theta (real DBRX: 500000)
    int32_t ffn_hidden = 0;               // ffn_config.ffn_hidden_size
    int32_t n_experts = 0;                // ffn_config.moe_num_experts
    int32_t top_k = 0;                    // ffn_config.moe_top_k
    std::optional<double> moe_norm_p;     // ffn_config.moe_normalize_expert_weights; nullopt = no division
    std::vector<int32_t> eos_ids;         // generation_config.json eos_token_id (int or list or null)

    int32_t qkv_rows() const { return d_model + 2 * n_kv_heads * head_dim; }
};

// Parses <dir>/config.json and <dir>/generation_config.json (the latter is optional).
// Throws dbrx::Error(DBRX_ERR_BAD_CHECKPOINT / DBRX_ERR_IO) naming the file and key.
ModelConfig load_model_config(const std::string &dir);
// Same, from JSON text (tests, fuzzing). generation_json may be empty.
ModelConfig parse_model_config(const std::string &config_json, const std::string &generation_json,
                               const std::string &where);

}  // namespace dbrx
