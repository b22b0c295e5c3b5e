// The model's weights in device memory (bf16), either uploaded from a checkpoint through pinned
// staging buffers or generated on the GPU (synthetic full-width models for `dbrx bench`).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_util.h"
#include "dist/shard_plan.h"
#include "io/checkpoint.h"

namespace dbrx::cuda {

struct DeviceLayer {
    DeviceBuffer norm_1, wqkv, out_proj, norm_2, router;
    DeviceBuffer w13;  // [E][2F][d]: expert e's w1 rows, then its v1 rows (gate and up in one GEMM)
    DeviceBuffer w2;   // [E][F][d]
};

struct DeviceModel {
    ModelConfig config;
    DeviceBuffer wte, norm_f, lm_head;
    std::vector<DeviceLayer> layers;
    DeviceBuffer inv_freq;  // RoPE: head_dim / 2 fp32 values
    int64_t bytes = 0;      // device memory taken by the weights
};

// Copies every weight to the device through two pinned staging buffers (copies overlap the host
// reads). progress(fraction, user) is called as bytes arrive; returning false aborts the load
// (DBRX_ERR_INVALID_ARGUMENT). Reports the device memory taken on stderr.
std::unique_ptr<DeviceModel> upload_model(const Checkpoint &ckpt, bool (*progress)(float, void *), void *user);

// Random weights of the given shape, generated on the device (nothing crosses PCIe):
// norms ~ U(0.5, 1.5), embeddings ~ U(-1, 1), router ~ U(-0.5, 0.5), other matrices ~ U(-a, a)
// with a = 1 / sqrt(fan_in), so activations stay O(1) through any number of layers.
std::unique_ptr<DeviceModel> synthetic_model(const ModelConfig &config, uint64_t seed);

// One rank's share of a sharded model (dist/shard_plan.h). Its config is the rank's view:
// n_heads, n_kv_heads and ffn_hidden are the rank's query heads, KV heads and FFN slice; d_model,
// n_experts (routing), vocab_size (token ids) and the rest stay global. Its tensors:
//   wte, norm_1, norm_2, norm_f, router: whole (replicated)
//   Wqkv      [nq*hd + 2*nkv*hd][d]: the rank's q rows, then its k rows, then its v rows
//   out_proj  [d][nq*hd]: the columns of the rank's query heads (row-parallel; packed, strided on disk)
//   w13       [E_local][2*fs][d], w2 [E_local][fs][d]: FFN rows [f0, f0+fs) of the rank's experts
//   lm_head   [vocab rows of the rank][d]
ModelConfig rank_config(const ModelConfig &global, const dist::RankShard &shard);
// Uploads only the rank's slices, read straight from the mmapped checkpoint, to the current device.
// progress(fraction of this rank's bytes, user) as upload_model.
std::unique_ptr<DeviceModel> upload_model_shard(const Checkpoint &ckpt, const dist::ShardPlan &plan, int32_t rank,
                                                bool (*progress)(float, void *), void *user);
// The rank's share of a synthetic model, generated on the current device (same scales as
// synthetic_model, taken from the global fan-in so sharded activations stay O(1) too).
std::unique_ptr<DeviceModel> synthetic_model_shard(const ModelConfig &global, const dist::ShardPlan &plan,
                                                   int32_t rank, uint64_t seed);

// The real DBRX shape (132B) with `layers` layers.
ModelConfig dbrx_config(int32_t layers);

}  // namespace dbrx::cuda
