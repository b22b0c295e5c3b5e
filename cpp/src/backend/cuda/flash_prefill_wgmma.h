// Prefill flash attention on Hopper's warpgroup MMA (sm_90a wgmma), head dim 128: the CUDA backend's
// default where it is supported (CudaBackend::FlashKernel), beside flash_prefill (kernels.h, the
// portable mma.sync kernel) with the same tile format and semantics (fp32 Q [T][H][hd] scaled
// by 1/sqrt(hd) inside, bf16 out [T][H][hd], causal over positions 0..p of the token's sequence, K/V
// from the paged cache).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/kernels.h"

namespace dbrx::cuda {

// True when head_dim is 128, block_size >= 1, the current device is a Hopper (compute capability 9.0)
// and this build holds the sm_90a kernel (CMAKE_CUDA_ARCHITECTURES with 90a).
bool flash_prefill_wgmma_supported(int32_t head_dim, int32_t block_size);

// flash_prefill() on wgmma (default shape). Throws dbrx::Error when !flash_prefill_wgmma_supported().
void flash_prefill_wgmma(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta,
                         KvLayer kv, bf16_t *out, cudaStream_t stream);

namespace wgfa {
// The key-tile / pipeline shapes the kernel is built in, for tests that compare and time them.
int32_t variant_count();
const char *variant_name(int32_t variant);  // "wgmma N keys, S stages"
int32_t default_variant();
void prefill_variant(int32_t variant, const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles,
                     TokenMeta meta, KvLayer kv, bf16_t *out, cudaStream_t stream);
}  // namespace wgfa

}  // namespace dbrx::cuda
