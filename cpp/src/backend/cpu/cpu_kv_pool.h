// The CPU backend's paged KV storage: one fp32 allocation holding, per layer and per block, the keys
// then the values of block_size tokens, each [block_size][n_kv_heads][head_dim].
#pragma once

#include <cstdint>
#include <memory>

#include "backend/cpu/kernels.h"
#include "model/backend.h"

namespace dbrx::cpu {

// Memory a CPU KV pool is offered when the caller gives only a fraction (all CPU backends, sharded or
// not): a fixed 2 GiB, because host RAM is shared with everything else on the machine and the weights
// stay mmapped.
constexpr int64_t kCpuKvMemory = int64_t{2} << 30;

class CpuKvPool final : public KvPool {
public:
    // Throws DBRX_ERR_INVALID_ARGUMENT for non-positive sizes, DBRX_ERR_OUT_OF_MEMORY when the
    // allocation fails. Contents start uninitialised: only written positions are ever read.
    CpuKvPool(int32_t n_layers, int32_t n_blocks, int32_t block_size, int32_t n_kv_heads, int32_t head_dim);

    int32_t n_blocks() const override { return n_blocks_; }
    int32_t block_size() const override { return block_size_; }
    int32_t n_layers() const { return n_layers_; }
    int32_t n_kv_heads() const { return n_kv_heads_; }
    int32_t head_dim() const { return head_dim_; }

    // Floats of K (or V) in one block of one layer.
    int64_t block_floats() const { return static_cast<int64_t>(block_size_) * n_kv_heads_ * head_dim_; }
    float *keys(int32_t layer, int32_t block) { return base(layer, block); }
    float *values(int32_t layer, int32_t block) { return base(layer, block) + block_floats(); }
    PagedKv layer_view(int32_t layer) const;

private:
    float *base(int32_t layer, int32_t block) const {
        return data_.get() + (static_cast<int64_t>(layer) * n_blocks_ + block) * 2 * block_floats();
    }

    int32_t n_layers_, n_blocks_, block_size_, n_kv_heads_, head_dim_;
    std::unique_ptr<float[]> data_;
};

}  // namespace dbrx::cpu
