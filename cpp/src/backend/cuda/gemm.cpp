#include "backend/cuda/gemm.h"

#include <algorithm>
#include <string>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {

// cuBLAS is column-major: a row-major [T][N] result is its column-major [N][T], so both calls
// compute y^T = op(W) x^T with the weight as the first operand.
void gemm_xwt(cublasHandle_t h, const bf16_t *x, int64_t T, int64_t K, const bf16_t *w, int64_t N, float *y,
              float beta) {
    if (T == 0) return;
    if (gemv_supported(T, K)) {  // decode sizes: our GEMV streams W at close to full bandwidth
        cudaStream_t stream = nullptr;
        DBRX_CUBLAS_CHECK(cublasGetStream(h, &stream));
        gemv_xwt(x, static_cast<int32_t>(T), static_cast<int32_t>(K), w, static_cast<int32_t>(N), y, beta, stream);
        return;
    }
    const float alpha = 1.f;
    DBRX_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(T),
                                   static_cast<int>(K), &alpha, w, CUDA_R_16BF, static_cast<int>(K), x, CUDA_R_16BF,
                                   static_cast<int>(K), &beta, y, CUDA_R_32F, static_cast<int>(N), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
}

void gemm_xwt_invariant(cublasHandle_t h, const bf16_t *x, int64_t T, int64_t K, const bf16_t *w, int64_t N,
                        float *y, float beta) {
    if (!gemv_supported(std::min<int64_t>(T, kGemvMaxTokens), K))
        fail(DBRX_ERR_UNSUPPORTED, "batch-invariant GEMM: K = " + std::to_string(K) + " does not fit the GEMV kernel");
    cudaStream_t stream = nullptr;
    DBRX_CUBLAS_CHECK(cublasGetStream(h, &stream));
    for (int64_t t0 = 0; t0 < T; t0 += kGemvMaxTokens) {
        const int32_t n = static_cast<int32_t>(std::min<int64_t>(kGemvMaxTokens, T - t0));
        gemv_xwt(x + t0 * K, n, static_cast<int32_t>(K), w, static_cast<int32_t>(N), y + t0 * N, beta, stream);
    }
}

void gemm_xw(cublasHandle_t h, const bf16_t *x, int64_t T, int64_t K, const bf16_t *w, int64_t N, float *y,
             float beta) {
    if (T == 0) return;
    const float alpha = 1.f;
    DBRX_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(T),
                                   static_cast<int>(K), &alpha, w, CUDA_R_16BF, static_cast<int>(N), x, CUDA_R_16BF,
                                   static_cast<int>(K), &beta, y, CUDA_R_32F, static_cast<int>(N), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
}

}  // namespace dbrx::cuda
