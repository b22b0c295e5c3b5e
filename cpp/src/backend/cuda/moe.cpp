#include "backend/cuda/moe.h"

#include <algorithm>

#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {

void MoeRouting::reserve(int32_t T, int32_t E, int32_t k) {
    const int64_t rows = static_cast<int64_t>(T) * k;
    logits.reserve(sizeof(float) * T * E, "router logits");
    experts.reserve(sizeof(int32_t) * rows, "router experts");
    weights.reserve(sizeof(float) * rows, "router weights");
    offsets.reserve(sizeof(int32_t) * (E + 1), "expert offsets");
    active.reserve(sizeof(int32_t) * (E + 1), "active experts");
    perm_row.reserve(sizeof(int32_t) * rows, "MoE permutation");
    row_token.reserve(sizeof(int32_t) * rows, "MoE permutation");
}

void MoeRouting::route(const bf16_t *x, int32_t T, int32_t d, const bf16_t *router, int32_t E, int32_t k,
                       float norm_p, cublasHandle_t blas, cudaStream_t stream) {
    gemm_xwt(blas, x, T, d, router, E, logits.as<float>());
    route_topk(logits.as<float>(), T, E, k, norm_p, experts.as<int32_t>(), weights.as<float>(), stream);
    moe_permute(experts.as<int32_t>(), T, E, k, offsets.as<int32_t>(), active.as<int32_t>(), perm_row.as<int32_t>(),
                row_token.as<int32_t>(), stream);
}

void Moe::forward(const bf16_t *x, int32_t T, const MoeWeights &w, float *h, cublasHandle_t blas,
                  cudaStream_t stream, MoePath path) {
    if (T == 0) return;
    const int32_t d = s_.d_model, F = s_.ffn, E = s_.n_experts, k = s_.top_k;
    const int64_t rows = static_cast<int64_t>(T) * k;
    if (path == MoePath::Auto) path = resolve(T);
    if (path == MoePath::Gemv && T > kMoeGemvMaxRows)
        invalid_argument("MoE GEMV path takes at most " + std::to_string(kMoeGemvMaxRows) + " tokens, got " +
                         std::to_string(T));
    if (path == MoePath::Grouped && !moe_grouped_supported(d, F))
        invalid_argument("MoE grouped path needs d_model % 128 == 0 and ffn % 64 == 0, got d_model " +
                         std::to_string(d) + ", ffn " + std::to_string(F));

    r_.reserve(T, E, k);
    xp_.reserve(sizeof(bf16_t) * rows * d, "permuted tokens");
    g_.reserve(sizeof(bf16_t) * rows * F, "expert activations");

    r_.route(x, T, d, w.router, E, k, s_.norm_p, blas, stream);
    gather_rows(x, r_.row_token.as<int32_t>(), xp_.as<bf16_t>(), static_cast<int32_t>(rows), d, stream);

    const int32_t max_active = static_cast<int32_t>(std::min<int64_t>(E, rows));
    if (path == MoePath::Gemv) {
        y_.reserve(sizeof(float) * kMoeDownSplits * rows * d, "expert outputs");
        moe_up_gemv(xp_.as<bf16_t>(), w.w13, r_.offsets.as<int32_t>(), r_.active.as<int32_t>(), max_active, T, d, F,
                    g_.as<bf16_t>(), stream);
        moe_down_gemv(g_.as<bf16_t>(), w.w2, r_.offsets.as<int32_t>(), r_.active.as<int32_t>(), max_active, T,
                      static_cast<int32_t>(rows), d, F, y_.as<float>(), stream);
        moe_unpermute(y_.as<float>(), kMoeDownSplits, rows * d, r_.perm_row.as<int32_t>(), r_.weights.as<float>(), T, k,
                      d, h, stream);
        return;
    }
    if (path == MoePath::Grouped) {
        y_.reserve(sizeof(float) * rows * d, "expert outputs");
        moe_up_grouped(xp_.as<bf16_t>(), w.w13, r_.offsets.as<int32_t>(), r_.active.as<int32_t>(), max_active, T, d, F,
                       g_.as<bf16_t>(), stream);
        moe_down_grouped(g_.as<bf16_t>(), w.w2, r_.offsets.as<int32_t>(), r_.active.as<int32_t>(), max_active, T, d, F,
                         y_.as<float>(), stream);
        moe_unpermute(y_.as<float>(), 1, rows * d, r_.perm_row.as<int32_t>(), r_.weights.as<float>(), T, k, d, h,
                      stream);
        return;
    }
    // Prefill-sized batches keep gate|up in bf16 (halves the traffic of the largest intermediate);
    // smaller ones keep fp32 (the GEMV-backed gemm_xwt for an expert's few rows, the GEMV path's numerics).
    const bool gu_bf16 = rows >= kMoeBf16GateUpRows;
    gu_.reserve((gu_bf16 ? sizeof(bf16_t) : sizeof(float)) * rows * 2 * F, "expert gate/up");
    y_.reserve(sizeof(float) * rows * d, "expert outputs");
    host_offsets_.reserve(sizeof(int32_t) * (E + 1));
    DBRX_CUDA_CHECK(cudaMemcpyAsync(host_offsets_.get(), r_.offsets.get(), sizeof(int32_t) * (E + 1),
                                    cudaMemcpyDeviceToHost, stream));
    DBRX_CUDA_CHECK(cudaStreamSynchronize(stream));
    const int32_t *off = host_offsets_.as<int32_t>();
    const float one = 1.f, zero = 0.f;
    for (int32_t e = 0; e < E; ++e) {
        const int32_t n = off[e + 1] - off[e];
        if (n == 0) continue;
        const bf16_t *we = w.w13 + static_cast<int64_t>(e) * 2 * F * d, *xe = xp_.as<bf16_t>() + int64_t{off[e]} * d;
        if (gu_bf16)
            DBRX_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, 2 * F, n, d, &one, we, CUDA_R_16BF, d, xe,
                                           CUDA_R_16BF, d, &zero, gu_.as<bf16_t>() + int64_t{off[e]} * 2 * F,
                                           CUDA_R_16BF, 2 * F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        else gemm_xwt(blas, xe, n, d, we, 2 * F, gu_.as<float>() + int64_t{off[e]} * 2 * F);
    }
    if (gu_bf16) silu_mul_bf16(gu_.as<bf16_t>(), g_.as<bf16_t>(), static_cast<int32_t>(rows), F, stream);
    else silu_mul(gu_.as<float>(), g_.as<bf16_t>(), static_cast<int32_t>(rows), F, stream);
    for (int32_t e = 0; e < E; ++e) {
        const int32_t n = off[e + 1] - off[e];
        if (n == 0) continue;
        gemm_xw(blas, g_.as<bf16_t>() + static_cast<int64_t>(off[e]) * F, n, F, w.w2 + static_cast<int64_t>(e) * F * d,
                d, y_.as<float>() + static_cast<int64_t>(off[e]) * d);
    }
    moe_unpermute(y_.as<float>(), 1, rows * d, r_.perm_row.as<int32_t>(), r_.weights.as<float>(), T, k, d, h, stream);
}

MoePath Moe::resolve(int32_t T) const {
    if (T <= kMoeAutoGemvMaxTokens) return MoePath::Gemv;
    if (T <= kMoeAutoGroupedMaxTokens && moe_grouped_supported(s_.d_model, s_.ffn)) return MoePath::Grouped;
    if (T <= kMoeGemvMaxRows) return MoePath::Gemv;
    return MoePath::Gemm;
}

int32_t Moe::active_experts(cudaStream_t stream) {
    int32_t n = 0;
    DBRX_CUDA_CHECK(cudaMemcpyAsync(&n, r_.active.get(), sizeof n, cudaMemcpyDeviceToHost, stream));
    DBRX_CUDA_CHECK(cudaStreamSynchronize(stream));
    return n;
}

}  // namespace dbrx::cuda
