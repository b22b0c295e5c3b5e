// A DBRX checkpoint directory: config, generation config and one or many safetensors shards
// (model.safetensors, or model.safetensors.index.json naming the shards). Every tensor the
// model needs is checked for presence, dtype BF16 and exact shape before anything runs.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "io/model_config.h"
#include "io/safetensors.h"
#include "util/bf16.h"

namespace dbrx {

struct LayerWeights {
    const bf16_t *norm_1 = nullptr;    // [d_model]                 norm_attn_norm.norm_1.weight
    const bf16_t *wqkv = nullptr;      // [d + 2*kv*hd, d_model]    norm_attn_norm.attn.Wqkv.weight
    const bf16_t *out_proj = nullptr;  // [d_model, d_model]        norm_attn_norm.attn.out_proj.weight
    const bf16_t *norm_2 = nullptr;    // [d_model]                 norm_attn_norm.norm_2.weight
    const bf16_t *router = nullptr;    // [n_experts, d_model]      ffn.router.layer.weight
    const bf16_t *w1 = nullptr;        // [n_experts*ffn, d_model]  ffn.experts.mlp.w1 (gate)
    const bf16_t *v1 = nullptr;        // [n_experts*ffn, d_model]  ffn.experts.mlp.v1 (up)
    const bf16_t *w2 = nullptr;        // [n_experts*ffn, d_model]  ffn.experts.mlp.w2 (down, NOT transposed)
};

struct ModelWeights {
    const bf16_t *wte = nullptr;       // [vocab, d_model]  transformer.wte.weight
    const bf16_t *norm_f = nullptr;    // [d_model]         transformer.norm_f.weight
    const bf16_t *lm_head = nullptr;   // [vocab, d_model]  lm_head.weight (untied)
    std::vector<LayerWeights> layers;
};

class Checkpoint {
public:
    // Throws dbrx::Error (BAD_CHECKPOINT naming the file/tensor/expected shape, or IO).
    static std::unique_ptr<Checkpoint> open(const std::string &dir);

    const std::string &dir() const { return dir_; }
    const ModelConfig &config() const { return config_; }
    // Pointers into the mmapped shards; valid while this Checkpoint lives.
    const ModelWeights &weights() const { return weights_; }
    int64_t weight_bytes() const { return weight_bytes_; }

private:
    Checkpoint() = default;
    std::string dir_;
    ModelConfig config_;
    std::vector<std::unique_ptr<SafetensorsFile>> shards_;
    ModelWeights weights_;
    int64_t weight_bytes_ = 0;
};

}  // namespace dbrx
