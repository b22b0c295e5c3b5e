// Small-batch expert GEMVs: at decode sizes the experts are a bandwidth problem, so each weight
// row is streamed once with 16-byte loads while the few token rows of its expert sit in shared
// memory. Routing is read on the device (offsets / active experts), so no host round trip.
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace {

constexpr int kUpWarps = 8;
constexpr int kUpRowsPerWarp = 2;
constexpr int kDownThreads = 128;

// grid (ceil(F / (warps * rows_per_warp)), max_active). Each warp computes gate and up of
// kUpRowsPerWarp rows j for all token rows of the block's expert.
template <int NT>
__global__ void __launch_bounds__(kUpWarps * 32)
    moe_up_kernel(const uint16_t *xp, const uint16_t *w13, const int32_t *offsets, const int32_t *active, int32_t d,
                  int32_t F, uint16_t *g) {
    extern __shared__ uint4 xs[];  // [NT][d / 8]
    const int32_t slot = blockIdx.y;
    if (slot >= active[0]) return;
    const int32_t e = active[1 + slot];
    const int32_t r0 = offsets[e], ne = offsets[e + 1] - r0;
    const int32_t vecs = d / 8;
    const uint4 *xsrc = reinterpret_cast<const uint4 *>(xp) + static_cast<int64_t>(r0) * vecs;
    for (int32_t i = threadIdx.x; i < ne * vecs; i += blockDim.x) xs[i] = xsrc[i];
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int32_t j0 = (blockIdx.x * kUpWarps + warp) * kUpRowsPerWarp;
    const uint4 *we = reinterpret_cast<const uint4 *>(w13) + static_cast<int64_t>(e) * 2 * F * vecs;
    float acc[kUpRowsPerWarp][2][NT];
#pragma unroll
    for (int r = 0; r < kUpRowsPerWarp; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[r][0][n] = acc[r][1][n] = 0.f;
    for (int32_t c = lane; c < vecs; c += 32) {
        uint4 w[kUpRowsPerWarp][2];
#pragma unroll
        for (int r = 0; r < kUpRowsPerWarp; ++r) {
            const int32_t j = min(j0 + r, F - 1);
            w[r][0] = load_stream(we + static_cast<int64_t>(j) * vecs + c);
            w[r][1] = load_stream(we + static_cast<int64_t>(F + j) * vecs + c);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            if (n >= ne) break;
            float x[8];
            unpack8(xs[n * vecs + c], x);
#pragma unroll
            for (int r = 0; r < kUpRowsPerWarp; ++r)
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    float f[8];
                    unpack8(w[r][u], f);
                    float s = acc[r][u][n];
#pragma unroll
                    for (int i = 0; i < 8; ++i) s += f[i] * x[i];
                    acc[r][u][n] = s;
                }
        }
    }
#pragma unroll
    for (int r = 0; r < kUpRowsPerWarp; ++r) {
        const int32_t j = j0 + r;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            if (n >= ne) break;
            const float gate = warp_sum(acc[r][0][n]), up = warp_sum(acc[r][1][n]);
            if (lane == 0 && j < F) g[static_cast<int64_t>(r0 + n) * F + j] = f2bf(silu(gate) * up);
        }
    }
}

// grid (ceil(d / (threads * 8)), kMoeDownSplits, max_active). Each thread owns 8 output columns
// and sums its split's rows j of W2[e] ([F][d], not transposed) weighted by g[row][j].
template <int NT>
__global__ void __launch_bounds__(kDownThreads)
    moe_down_kernel(const uint16_t *g, const uint16_t *w2, const int32_t *offsets, const int32_t *active, int32_t d,
                    int32_t F, int32_t n_rows, float *y) {
    extern __shared__ float gs[];  // [NT][chunk]
    const int32_t slot = blockIdx.z;
    if (slot >= active[0]) return;
    const int32_t e = active[1 + slot];
    const int32_t r0 = offsets[e], ne = offsets[e + 1] - r0;
    const int32_t chunk = (F + kMoeDownSplits - 1) / kMoeDownSplits;
    const int32_t jb = blockIdx.y * chunk, je = min(F, jb + chunk);
    for (int32_t i = threadIdx.x; i < ne * chunk; i += blockDim.x) {
        const int32_t n = i / chunk, j = jb + i % chunk;
        gs[i] = j < je ? bf16f(g[static_cast<int64_t>(r0 + n) * F + j]) : 0.f;
    }
    __syncthreads();
    const int32_t c8 = blockIdx.x * kDownThreads + threadIdx.x;  // which 8-column group
    const int32_t vecs = d / 8;
    if (c8 >= vecs) return;
    const uint4 *we = reinterpret_cast<const uint4 *>(w2) + static_cast<int64_t>(e) * F * vecs + c8;
    float acc[NT][8];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[n][i] = 0.f;
#pragma unroll 4
    for (int32_t j = jb; j < je; ++j) {
        float f[8];
        unpack8(load_stream(we + static_cast<int64_t>(j) * vecs), f);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            if (n >= ne) break;
            const float gv = gs[n * chunk + (j - jb)];
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[n][i] += gv * f[i];
        }
    }
    float *yp = y + static_cast<int64_t>(blockIdx.y) * n_rows * d;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        if (n >= ne) break;
        float4 *dst = reinterpret_cast<float4 *>(yp + static_cast<int64_t>(r0 + n) * d + c8 * 8);
        dst[0] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
        dst[1] = make_float4(acc[n][4], acc[n][5], acc[n][6], acc[n][7]);
    }
}

template <int NT>
void launch_up(const bf16_t *xp, const bf16_t *w13, const int32_t *offsets, const int32_t *active, int32_t max_active,
               int32_t d, int32_t F, bf16_t *g, cudaStream_t stream) {
    const size_t smem = static_cast<size_t>(NT) * d * sizeof(bf16_t);
    static std::atomic<uint32_t> smem_set{0};
    allow_max_dynamic_smem(reinterpret_cast<const void *>(moe_up_kernel<NT>), smem_set);
    const int32_t rows_per_block = kUpWarps * kUpRowsPerWarp;
    moe_up_kernel<NT><<<dim3((F + rows_per_block - 1) / rows_per_block, max_active), kUpWarps * 32, smem, stream>>>(
        xp, w13, offsets, active, d, F, g);
    DBRX_CUDA_LAUNCH_CHECK();
}

template <int NT>
void launch_down(const bf16_t *g, const bf16_t *w2, const int32_t *offsets, const int32_t *active,
                 int32_t max_active, int32_t n_rows, int32_t d, int32_t F, float *y, cudaStream_t stream) {
    const int32_t chunk = (F + kMoeDownSplits - 1) / kMoeDownSplits;
    const size_t smem = static_cast<size_t>(NT) * chunk * sizeof(float);
    static std::atomic<uint32_t> smem_set{0};
    allow_max_dynamic_smem(reinterpret_cast<const void *>(moe_down_kernel<NT>), smem_set);
    const int32_t vecs = d / 8;
    moe_down_kernel<NT><<<dim3((vecs + kDownThreads - 1) / kDownThreads, kMoeDownSplits, max_active), kDownThreads,
                          smem, stream>>>(g, w2, offsets, active, d, F, n_rows, y);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace

void moe_up_gemv(const bf16_t *xp, const bf16_t *w13, const int32_t *offsets, const int32_t *active,
                 int32_t max_active, int32_t max_rows, int32_t d, int32_t ffn, bf16_t *g, cudaStream_t stream) {
    if (d % 8 != 0) invalid_argument("moe_up_gemv: d_model must be a multiple of 8");
    if (max_active == 0) return;
    if (max_rows <= 1) launch_up<1>(xp, w13, offsets, active, max_active, d, ffn, g, stream);
    else if (max_rows <= 2) launch_up<2>(xp, w13, offsets, active, max_active, d, ffn, g, stream);
    else if (max_rows <= 4) launch_up<4>(xp, w13, offsets, active, max_active, d, ffn, g, stream);
    else if (max_rows <= kMoeGemvMaxRows) launch_up<8>(xp, w13, offsets, active, max_active, d, ffn, g, stream);
    else invalid_argument("moe_up_gemv: more than 8 rows per expert");
}

void moe_down_gemv(const bf16_t *g, const bf16_t *w2, const int32_t *offsets, const int32_t *active,
                   int32_t max_active, int32_t max_rows, int32_t n_rows, int32_t d, int32_t ffn, float *y,
                   cudaStream_t stream) {
    if (d % 8 != 0) invalid_argument("moe_down_gemv: d_model must be a multiple of 8");
    if (max_active == 0) return;
    if (max_rows <= 1) launch_down<1>(g, w2, offsets, active, max_active, n_rows, d, ffn, y, stream);
    else if (max_rows <= 2) launch_down<2>(g, w2, offsets, active, max_active, n_rows, d, ffn, y, stream);
    else if (max_rows <= 4) launch_down<4>(g, w2, offsets, active, max_active, n_rows, d, ffn, y, stream);
    else if (max_rows <= kMoeGemvMaxRows) launch_down<8>(g, w2, offsets, active, max_active, n_rows, d, ffn, y, stream);
    else invalid_argument("moe_down_gemv: more than 8 rows per expert");
}

}  // namespace dbrx::cuda
