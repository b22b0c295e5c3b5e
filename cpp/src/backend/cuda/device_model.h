// The model's weights in device memory (bf16), either uploaded from a checkpoint through pinned
// staging buffers or generated on the GPU (synthetic full-width models for `dbrx bench`).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_util.h"
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

// The real DBRX shape (132B) with `layers` layers.
ModelConfig dbrx_config(int32_t layers);

}  // namespace dbrx::cuda
