// y[T][N] = beta * y + x[T][K] . W[N][K]^T for a few tokens (decode): a bandwidth problem, so each
// weight row is streamed once with 16-byte loads while the T input rows sit in shared memory.
// cuBLAS reaches about half the HBM bandwidth at these shapes.
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;

template <int NT>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_kernel(const uint16_t *x, int32_t T, int32_t K, const uint16_t *w, int32_t N, float *y, float beta) {
    extern __shared__ uint4 xs[];  // [T][K / 8]
    const int32_t vecs = K / 8;
    const uint4 *xsrc = reinterpret_cast<const uint4 *>(x);
    for (int32_t i = threadIdx.x; i < T * vecs; i += blockDim.x) xs[i] = xsrc[i];
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint4 *wv = reinterpret_cast<const uint4 *>(w);
    for (int32_t n0 = (blockIdx.x * kWarps + warp) * kRowsPerWarp; n0 < N; n0 += gridDim.x * kWarps * kRowsPerWarp) {
        float acc[kRowsPerWarp][NT];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[r][t] = 0.f;
#pragma unroll 4
        for (int32_t c = lane; c < vecs; c += 32) {
            float f[kRowsPerWarp][8];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r)
                unpack8(load_stream(wv + static_cast<int64_t>(min(n0 + r, N - 1)) * vecs + c), f[r]);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t >= T) break;
                float xf[8];
                unpack8(xs[t * vecs + c], xf);
#pragma unroll
                for (int r = 0; r < kRowsPerWarp; ++r) {
                    float s = acc[r][t];
#pragma unroll
                    for (int i = 0; i < 8; ++i) s += f[r][i] * xf[i];
                    acc[r][t] = s;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t >= T) break;
                const float s = warp_sum(acc[r][t]);
                if (lane == 0 && n0 + r < N) {
                    float *dst = y + static_cast<int64_t>(t) * N + n0 + r;
                    *dst = beta == 0.f ? s : beta * *dst + s;
                }
            }
    }
}

// Few output rows (the router: N = n_experts): the 8 warps of a block split K for one row each pair
// and combine their partial sums in a fixed order, so 16 rows still spread over many SMs.
template <int NT>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_ksplit_kernel(const uint16_t *x, int32_t T, int32_t K, const uint16_t *w, int32_t N, float *y, float beta) {
    __shared__ float part[kWarps][NT];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int32_t n = blockIdx.x, vecs = K / 8;
    const int32_t per_warp = (vecs + kWarps - 1) / kWarps;
    const int32_t c0 = warp * per_warp, c1 = min(vecs, c0 + per_warp);
    const uint4 *wr = reinterpret_cast<const uint4 *>(w) + static_cast<int64_t>(n) * vecs;
    const uint4 *xv = reinterpret_cast<const uint4 *>(x);
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.f;
    for (int32_t c = c0 + lane; c < c1; c += 32) {
        float f[8];
        unpack8(load_stream(wr + c), f);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t >= T) break;
            float xf[8];
            unpack8(xv[static_cast<int64_t>(t) * vecs + c], xf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[t] += f[i] * xf[i];
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) part[warp][t] = s;
    }
    __syncthreads();
    if (threadIdx.x < T) {
        float s = 0.f;
        for (int w8 = 0; w8 < kWarps; ++w8) s += part[w8][threadIdx.x];
        float *dst = y + static_cast<int64_t>(threadIdx.x) * N + n;
        *dst = beta == 0.f ? s : beta * *dst + s;
    }
}

template <int NT>
void launch(const bf16_t *x, int32_t T, int32_t K, const bf16_t *w, int32_t N, float *y, float beta,
            cudaStream_t stream) {
    if (N < 1024) {
        gemv_ksplit_kernel<NT><<<N, kWarps * 32, 0, stream>>>(x, T, K, w, N, y, beta);
        DBRX_CUDA_LAUNCH_CHECK();
        return;
    }
    const size_t smem = static_cast<size_t>(T) * K * sizeof(bf16_t);
    static std::atomic<uint32_t> smem_set{0};
    allow_max_dynamic_smem(reinterpret_cast<const void *>(gemv_kernel<NT>), smem_set);
    const int32_t per_block = kWarps * kRowsPerWarp;
    const int32_t blocks = (N + per_block - 1) / per_block;
    gemv_kernel<NT><<<blocks, kWarps * 32, smem, stream>>>(x, T, K, w, N, y, beta);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool gemv_supported(int64_t T, int64_t K) {
    return T >= 1 && T <= kGemvMaxTokens && K % 8 == 0 && K * T * 2 <= 200 * 1024;
}

void gemv_xwt(const bf16_t *x, int32_t T, int32_t K, const bf16_t *w, int32_t N, float *y, float beta,
              cudaStream_t stream) {
    if (!gemv_supported(T, K)) invalid_argument("gemv_xwt: unsupported shape T=" + std::to_string(T) + " K=" + std::to_string(K));
    if (T == 1) launch<1>(x, T, K, w, N, y, beta, stream);
    else if (T == 2) launch<2>(x, T, K, w, N, y, beta, stream);
    else if (T <= 4) launch<4>(x, T, K, w, N, y, beta, stream);
    else launch<8>(x, T, K, w, N, y, beta, stream);
}

}  // namespace dbrx::cuda
