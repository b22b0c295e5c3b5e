// What a CudaBackend that is one rank of a sharded model (dist/sharded_cuda_backend.h) hands to
// its rank: the three places where the rank's partial results meet the other ranks'. With no hooks
// set the backend is the plain one-GPU backend. Only included in CUDA builds.
//
// The rank's DeviceModel holds its shard (backend/cuda/device_model.h: upload_model_shard), and its
// config counts the rank's query heads, KV heads and FFN slice, so the backend's own attention runs
// unchanged on the rank's heads; these hooks take over what crosses ranks.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "util/bf16.h"

namespace dbrx::dist {

class CudaRankHooks {
public:
    virtual ~CudaRankHooks() = default;
    // h[T][d] += sum over ranks of attn[T][nq * hd] . out_proj_cols^T (row-parallel out_proj).
    virtual void out_proj(int32_t layer, const bf16_t *attn, int32_t n_tokens, float *h, cublasHandle_t blas,
                          cudaStream_t stream) = 0;
    // h[T][d] += sum over ranks of the rank's experts' FFN slices applied to x[T][d] (routing replicated).
    virtual void moe(int32_t layer, const bf16_t *x, int32_t n_tokens, float *h, cublasHandle_t blas,
                     cudaStream_t stream) = 0;
    // logits[n_rows][vocab] = x . lm_head^T: each rank its vocabulary slice, then all-gathered.
    virtual void lm_head(const bf16_t *x, int32_t n_rows, float *logits, cublasHandle_t blas, cudaStream_t stream) = 0;
    // Whether a decode step of n_tokens through these hooks may be captured in a CUDA graph: the
    // collectives only enqueue (no host wait) and the rank's MoE needs no host round trip. Every
    // rank must answer alike for a step, since all ranks must capture the same collectives.
    virtual bool capturable(int32_t n_tokens) const = 0;
};

}  // namespace dbrx::dist
