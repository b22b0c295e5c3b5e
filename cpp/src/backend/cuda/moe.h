// One MoE layer on the GPU: router GEMM, fused softmax/top-k/renormalise, permutation by expert on
// the device, expert GEMMs with gate and up fused in one weight [E][2F][d], SiLU*up, and the
// weighted un-permute added into the residual.
#pragma once

#include <cstdint>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/kernels.h"
#include "util/bf16.h"

namespace dbrx::cuda {

struct MoeShape {
    int32_t d_model = 0;
    int32_t ffn = 0;
    int32_t n_experts = 0;
    int32_t top_k = 0;
    float norm_p = 0.f;  // <= 0: weights not renormalised
};

struct MoeWeights {
    const bf16_t *router = nullptr;  // [E][d]
    const bf16_t *w13 = nullptr;     // [E][2F][d]: rows of w1 (gate) then v1 (up) of each expert
    const bf16_t *w2 = nullptr;      // [E][F][d]
};

enum class MoePath {
    Auto,     // the fastest for the token count (Moe::resolve)
    Gemv,     // device-routed GEMV kernels (T <= kMoeGemvMaxRows); no host round trip
    Grouped,  // device-routed grouped tensor-core GEMMs (moe_grouped_supported shapes); no host round trip
    Gemm,     // cuBLAS per expert; reads the expert offsets back to the host once per layer
};

// Auto's token-count ranges, measured on the H200 at the DBRX shape (CudaMoe.GroupedMatchesCublas-
// AcrossTokenCounts): GEMV 0.40 ms at T=1; grouped 1.06 / 1.41 / 1.57 / 1.68 ms at T=4 / 8 / 16 / 64
// (GEMV 1.08 / 1.79, cuBLAS 1.25 / 1.68 / 2.21 / 1.83); cuBLAS from T=128 (1.90 ms, grouped 2.17).
constexpr int32_t kMoeAutoGemvMaxTokens = 3;
constexpr int32_t kMoeAutoGroupedMaxTokens = 64;
static_assert(kMoeAutoGemvMaxTokens <= kMoeGemvMaxRows && kMoeAutoGemvMaxTokens <= kMoeAutoGroupedMaxTokens);

// The router and the permutation by expert of T tokens, shared by Moe and the expert-parallel MoE of a
// sharded rank: logits = x router^T [T][E], the top-k experts and weights of each token [T][k], rows
// grouped by expert (offsets [E+1], active experts, perm_row / row_token of each of the T k rows).
struct MoeRouting {
    DeviceBuffer logits, experts, weights, offsets, active, perm_row, row_token;
    // Sizes the buffers for T tokens (host side; before any launch that uses them).
    void reserve(int32_t T, int32_t E, int32_t k);
    // After reserve: router GEMM, route_topk and moe_permute on `stream`.
    void route(const bf16_t *x, int32_t T, int32_t d, const bf16_t *router, int32_t E, int32_t k, float norm_p,
               cublasHandle_t blas, cudaStream_t stream);
};

class Moe {
public:
    explicit Moe(const MoeShape &shape) : s_(shape) {}
    // h[t] += MoE(x[t]) for x [T][d] bf16 (the normalised input), h [T][d] fp32.
    void forward(const bf16_t *x, int32_t n_tokens, const MoeWeights &w, float *h, cublasHandle_t blas,
                 cudaStream_t stream, MoePath path = MoePath::Auto);
    // After forward: the router's choices [T][k] and the number of distinct experts used (synchronises).
    const int32_t *experts() const { return r_.experts.as<int32_t>(); }
    const float *weights() const { return r_.weights.as<float>(); }
    const float *router_logits() const { return r_.logits.as<float>(); }  // [T][E] fp32
    int32_t active_experts(cudaStream_t stream);
    const MoeShape &shape() const { return s_; }
    // The path Auto takes for n_tokens: GEMV, then grouped GEMMs up to the kMoeAuto*MaxTokens
    // bounds where the shape allows them, cuBLAS above (GEMV up to kMoeGemvMaxRows where grouped
    // does not fit the shape).
    MoePath resolve(int32_t n_tokens) const;
    // True when forward's Auto path for n_tokens needs no host synchronisation (CUDA-graph capture).
    bool capturable(int32_t n_tokens) const { return resolve(n_tokens) != MoePath::Gemm; }

private:
    MoeShape s_;
    MoeRouting r_;
    DeviceBuffer xp_, gu_, g_, y_;
    PinnedBuffer host_offsets_;
};

}  // namespace dbrx::cuda
