// Grouped expert GEMMs on the tensor cores (mma.sync m16n8k16 bf16, fp32 accumulation), driven by
// the device-side routing: each block owns one (active expert, N tile) and walks that expert's rows
// in passes of BM, so at mid token counts (one pass) every weight byte is read once per layer.
// Weights stream through a multi-stage cp.async pipeline; the gate|up kernel applies SiLU(gate)*up
// in its epilogue and writes bf16 g, the down kernel writes fp32 rows for moe_unpermute.
#include <algorithm>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/kernels.h"
#include "backend/cuda/mma_ptx.cuh"

namespace dbrx::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: 2 along M (interleaved 16-row slices) x 4 along N
constexpr int kBN = 128;       // tile columns (up: 64 gate + 64 up outputs of the same j)
constexpr int kBK = 64;  // 128 bytes of each weight row per stage
constexpr int kPadK = kBK + 8;  // smem row stride (elements) of K-major tiles: ldmatrix without bank conflicts
constexpr int kPadN = kBN + 8;  // smem row stride of the N-major W2 tile

// Weights are read once: ask L2 to drop them first so the activations (re-read by every N tile)
// stay, and to fetch 256 bytes of the row at a time (the next stage reads the other half).
__device__ __forceinline__ void cp_async_stream(uint32_t dst, const void *src, uint64_t policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "l"(policy));
}
__device__ __forceinline__ void cp_async(uint32_t dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

template <bool UP, int MI> struct Tile {
    static constexpr int BM = 2 * MI * 16;
    static constexpr int kStages = MI == 4 ? 3 : 4;  // MI 2 and 4: two blocks per SM; MI 8: one
    static constexpr int kAElems = BM * kPadK;
    static constexpr int kBElems = UP ? kBN * kPadK : kBK * kPadN;
    static constexpr int kStageElems = kAElems + kBElems;
    static constexpr size_t kSmemBytes = sizeof(uint16_t) * kStageElems * kStages;
};

// UP: a = xp [rows][K = d], W13[e] [2N][K] (N = F), out = g bf16 [rows][N] = SiLU(a W1^T) * (a V1^T).
// !UP: a = g [rows][K = F], W2[e] [K][N] (N = d), out = y fp32 [rows][N] = a W2.
// grid (N tiles, max_active); blocks whose slot has no active expert exit at once.
template <bool UP, int MI>
__global__ void __launch_bounds__(kThreads, MI >= 8 ? 1 : 2)
    grouped_kernel(const uint16_t *a, const uint16_t *w, const int32_t *offsets, const int32_t *active, int32_t K,
                   int32_t N, void *out) {
    using Cfg = Tile<UP, MI>;
    constexpr int BM = Cfg::BM, kStages = Cfg::kStages;
    extern __shared__ __align__(16) uint16_t smem[];
    const int32_t slot = blockIdx.y;
    if (slot >= active[0]) return;
    const int32_t e = active[1 + slot];
    const int32_t r0 = offsets[e], ne = offsets[e + 1] - r0;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / 4, wn = warp % 4;
    const int32_t KT = K / kBK;
    const int32_t n0 = blockIdx.x * (UP ? kBN / 2 : kBN);
    const uint16_t *we = w + static_cast<int64_t>(e) * (UP ? 2 : 1) * N * K;
    const uint64_t policy = evict_first_policy();

    // Each thread's four 16-byte weight chunks of a stage: source row start and smem offset.
    constexpr int kBChunks = 4;  // 128 rows x 8 chunks (up) or 64 rows x 16 chunks (down) over 256 threads
    const uint16_t *b_src[kBChunks];
    int b_dst[kBChunks];
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
        const int c = tid + i * kThreads;
        if constexpr (UP) {
            // Tile row r: warp column wn = r / 32 holds gate rows j0 + wn*16 + [0,16) then the up rows of the same j.
            const int r = c / 8, ch = c % 8, q = r % 32, j = n0 + (r / 32) * 16 + (q % 16);
            b_src[i] = we + static_cast<int64_t>(q < 16 ? j : N + j) * K + ch * 8;
            b_dst[i] = r * kPadK + ch * 8;
        } else {
            const int r = c / 16, ch = c % 16;
            b_src[i] = we + static_cast<int64_t>(r) * N + n0 + ch * 8;
            b_dst[i] = r * kPadN + ch * 8;
        }
    }
    const uint32_t smem_base = smem_u32(smem);
    constexpr int kAChunks = BM * (kBK / 8) / kThreads;  // = MI

    float acc[MI][4][4];
    for (int32_t m0 = 0; m0 < ne; m0 += BM) {
        const int32_t rows = min(BM, ne - m0);
        const uint16_t *a_rows = a + static_cast<int64_t>(r0 + m0) * K;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.f;

        auto load = [&](int stage, int32_t kt) {
            const uint32_t sa = smem_base + 2u * stage * Cfg::kStageElems;
            const uint32_t sb = sa + 2u * Cfg::kAElems;
            const int64_t k0 = static_cast<int64_t>(kt) * kBK;
#pragma unroll
            for (int i = 0; i < kAChunks; ++i) {
                const int c = tid + i * kThreads, r = c / 8, ch = c % 8;
                if (r < rows) cp_async(sa + 2u * (r * kPadK + ch * 8), a_rows + static_cast<int64_t>(r) * K + k0 + ch * 8);
            }
#pragma unroll
            for (int i = 0; i < kBChunks; ++i)
                cp_async_stream(sb + 2u * b_dst[i], b_src[i] + (UP ? k0 : k0 * N), policy);
        };

        __syncthreads();  // the previous pass has finished reading every stage
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < KT) load(s, s);
            cp_commit();
        }
        for (int32_t kt = 0; kt < KT; ++kt) {
            cp_wait<kStages - 2>();
            __syncthreads();
            const int32_t pf = kt + kStages - 1;
            if (pf < KT) load(pf % kStages, pf);
            cp_commit();
            const int stage = kt % kStages;
            const uint32_t sa = smem_base + 2u * stage * Cfg::kStageElems;
            const uint32_t sb = sa + 2u * Cfg::kAElems;
#pragma unroll
            for (int kk = 0; kk < kBK / 16; ++kk) {
                uint32_t b[4][2];
#pragma unroll
                for (int p = 0; p < 2; ++p) {
                    uint32_t r[4];
                    if constexpr (UP) {
                        const int n = wn * 32 + p * 16 + (lane % 8) + (lane / 16) * 8;
                        ldsm_x4(sb + 2u * (n * kPadK + kk * 16 + ((lane / 8) % 2) * 8), r);
                    } else {
                        const int k = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                        ldsm_x4_trans(sb + 2u * (k * kPadN + wn * 32 + p * 16 + (lane / 16) * 8), r);
                    }
                    b[2 * p][0] = r[0];
                    b[2 * p][1] = r[1];
                    b[2 * p + 1][0] = r[2];
                    b[2 * p + 1][1] = r[3];
                }
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const int ms = mi * 2 + wm;  // 16-row slice; slices past the rows are skipped
                    if (ms * 16 < rows) {
                        uint32_t af[4];
                        ldsm_x4(sa + 2u * ((ms * 16 + lane % 16) * kPadK + kk * 16 + (lane / 16) * 8), af);
#pragma unroll
                        for (int ni = 0; ni < 4; ++ni) mma_bf16(acc[mi][ni], af, b[ni][0], b[ni][1]);
                    }
                }
            }
        }
        cp_wait<0>();

        // Epilogue: c0,c1 at (row lane/4, cols 2*(lane%4) + {0,1}); c2,c3 eight rows below.
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const int ms = mi * 2 + wm;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = ms * 16 + lane / 4 + h * 8;
                if (row >= rows) continue;
                const int64_t grow = static_cast<int64_t>(r0 + m0 + row) * N;
                if constexpr (UP) {
                    uint16_t *g = static_cast<uint16_t *>(out);
#pragma unroll
                    for (int ni = 0; ni < 2; ++ni) {
                        const int j = n0 + wn * 16 + ni * 8 + (lane % 4) * 2;
                        const float v0 = silu(acc[mi][ni][2 * h]) * acc[mi][ni + 2][2 * h];
                        const float v1 = silu(acc[mi][ni][2 * h + 1]) * acc[mi][ni + 2][2 * h + 1];
                        *reinterpret_cast<uint32_t *>(g + grow + j) =
                            static_cast<uint32_t>(f2bf(v0)) | (static_cast<uint32_t>(f2bf(v1)) << 16);
                    }
                } else {
                    float *y = static_cast<float *>(out);
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        const int col = n0 + wn * 32 + ni * 8 + (lane % 4) * 2;
                        *reinterpret_cast<float2 *>(y + grow + col) =
                            make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
                    }
                }
            }
        }
    }
}

template <bool UP, int MI>
void launch(const bf16_t *a, const bf16_t *w, const int32_t *offsets, const int32_t *active, int32_t max_active,
            int32_t K, int32_t N, void *out, cudaStream_t stream) {
    static std::atomic<uint32_t> smem_set{0};
    allow_max_dynamic_smem(reinterpret_cast<const void *>(grouped_kernel<UP, MI>), smem_set);
    const int32_t n_tiles = N / (UP ? kBN / 2 : kBN);
    grouped_kernel<UP, MI><<<dim3(n_tiles, max_active), kThreads, Tile<UP, MI>::kSmemBytes, stream>>>(
        reinterpret_cast<const uint16_t *>(a), reinterpret_cast<const uint16_t *>(w), offsets, active, K, N, out);
    DBRX_CUDA_LAUNCH_CHECK();
}

// Rows per pass from the bound on any one expert's rows (an expert gets at most one row per token).
template <bool UP>
void dispatch(const bf16_t *a, const bf16_t *w, const int32_t *offsets, const int32_t *active, int32_t max_active,
              int32_t max_rows, int32_t K, int32_t N, void *out, cudaStream_t stream) {
    if (max_active == 0 || max_rows == 0) return;
    if (max_rows <= Tile<UP, 2>::BM) launch<UP, 2>(a, w, offsets, active, max_active, K, N, out, stream);
    else if (max_rows <= Tile<UP, 4>::BM) launch<UP, 4>(a, w, offsets, active, max_active, K, N, out, stream);
    else launch<UP, 8>(a, w, offsets, active, max_active, K, N, out, stream);
}

__global__ void silu_mul_bf16_kernel(const uint32_t *gu, uint32_t *g, int32_t n_rows, int32_t half_f) {
    const int64_t n = static_cast<int64_t>(n_rows) * half_f;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t row = i / half_f, j = i % half_f;
        const uint32_t gate = gu[row * 2 * half_f + j], up = gu[row * 2 * half_f + half_f + j];
        g[i] = static_cast<uint32_t>(f2bf(silu(bf16_lo(gate)) * bf16_lo(up))) |
               (static_cast<uint32_t>(f2bf(silu(bf16_hi(gate)) * bf16_hi(up))) << 16);
    }
}

}  // namespace

bool moe_grouped_supported(int32_t d, int32_t ffn) {
    return d > 0 && ffn > 0 && d % kBK == 0 && ffn % kBK == 0 && ffn % (kBN / 2) == 0 && d % kBN == 0;
}

namespace {
void require_grouped_shape(const char *who, int32_t d, int32_t ffn) {
    if (!moe_grouped_supported(d, ffn))
        invalid_argument(std::string(who) + ": d_model " + std::to_string(d) + " / ffn " + std::to_string(ffn) +
                         " not multiples of the tile (d % 128, ffn % 64)");
}
}  // namespace

void moe_up_grouped(const bf16_t *xp, const bf16_t *w13, const int32_t *offsets, const int32_t *active,
                    int32_t max_active, int32_t max_rows, int32_t d, int32_t ffn, bf16_t *g, cudaStream_t stream) {
    require_grouped_shape("moe_up_grouped", d, ffn);
    dispatch<true>(xp, w13, offsets, active, max_active, max_rows, d, ffn, g, stream);
}

void moe_down_grouped(const bf16_t *g, const bf16_t *w2, const int32_t *offsets, const int32_t *active,
                      int32_t max_active, int32_t max_rows, int32_t d, int32_t ffn, float *y, cudaStream_t stream) {
    require_grouped_shape("moe_down_grouped", d, ffn);
    dispatch<false>(g, w2, offsets, active, max_active, max_rows, ffn, d, y, stream);
}

void silu_mul_bf16(const bf16_t *gu, bf16_t *g, int32_t n_rows, int32_t ffn, cudaStream_t stream) {
    if (ffn % 2 != 0) invalid_argument("silu_mul_bf16: ffn must be even");
    if (n_rows == 0) return;
    const int64_t n = static_cast<int64_t>(n_rows) * ffn / 2;
    const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 132 * 32));
    silu_mul_bf16_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<const uint32_t *>(gu),
                                                    reinterpret_cast<uint32_t *>(g), n_rows, ffn / 2);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace dbrx::cuda
