// cuBLAS GEMMs in the row-major terms of the model: bf16 inputs, fp32 accumulation and output.
#pragma once

#include <cublas_v2.h>

#include <cstdint>

#include "util/bf16.h"

namespace dbrx::cuda {

// y[T][N] = beta * y + x[T][K] . W[N][K]^T  (torch Linear; beta = 1 adds into a residual).
// Up to kGemvMaxTokens tokens this runs the backend's own GEMV (kernels.h), above it cuBLAS.
void gemm_xwt(cublasHandle_t h, const bf16_t *x, int64_t T, int64_t K, const bf16_t *w, int64_t N, float *y,
              float beta = 0.f);
// The same product, each row bitwise independent of T: the GEMV over groups of kGemvMaxTokens rows
// (the GEMV's per-row summation order does not depend on how many rows share a launch). For the
// batch-invariant mode; K must qualify for the GEMV (gemv_supported).
void gemm_xwt_invariant(cublasHandle_t h, const bf16_t *x, int64_t T, int64_t K, const bf16_t *w, int64_t N,
                        float *y, float beta = 0.f);
// y[T][N] = beta * y + x[T][K] . W[K][N]  (W not transposed: the DBRX expert down projection).
void gemm_xw(cublasHandle_t h, const bf16_t *x, int64_t T, int64_t K, const bf16_t *w, int64_t N, float *y,
             float beta = 0.f);

}  // namespace dbrx::cuda
