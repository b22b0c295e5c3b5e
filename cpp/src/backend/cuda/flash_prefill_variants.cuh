// The CTA shapes the prefill flash kernel is compiled in at head dim 128 (host declarations only):
// the tests check that every shape gives the same result and time them against each other, so the
// default (flash_prefill) can be chosen by measurement.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/kernels.h"

namespace dbrx::cuda::flash {

int32_t variant_count();
// "W warps x R rows, N keys, S stages[, CTAs per SM]"
const char *variant_name(int32_t variant);
// The variant flash_prefill uses at head dim 128.
int32_t default_variant();
// flash_prefill at head dim 128 with the given variant (kv.head_dim must be 128).
void prefill_variant(int32_t variant, const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles,
                     TokenMeta meta, KvLayer kv, bf16_t *out, cudaStream_t stream);

}  // namespace dbrx::cuda::flash
