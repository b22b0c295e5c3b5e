// Expert GEMMs for a few rows per expert as streaming tensor-core GEMVs, driven by the device-side
// routing. The weight rows are the mma's M side and the expert's token rows its N side (8 per
// tile), so a token costs 8 columns, not 16 rows. Weights go straight from HBM into registers with
// 16-byte coalesced loads, no shared memory, no barriers: the K order inside a chunk is permuted
// identically on both operands, which the sum does not see. Up: a 16-row tile is 8 gate rows and
// the 8 up rows of the same j, so SiLU(gate)*up happens in the accumulators' registers.
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kUpTiles = 2;  // 16-row tiles per warp in the up kernel: 16 values of j
constexpr int kDownTiles = 4;  // 16-row tiles per warp in the down kernel: 64 output columns

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// i is a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t word(const uint4 &v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// grid (F / (kWarps * 8 * kUpTiles), max_active). Chunks of 64 k: lane (g, t) = (lane / 4, lane % 4)
// holds k [64c + 16t, 64c + 16t + 16) of its rows (two 16-byte words); k16 step s takes word s / 2,
// pairs 2 (s % 2) and 2 (s % 2) + 1, on the weight rows and the token rows alike.
template <int NT>
__global__ void __launch_bounds__(kWarps * 32)
    stream_up_kernel(const uint16_t *xp, const uint16_t *w13, const int32_t *offsets, const int32_t *active,
                     int32_t d, int32_t F, uint16_t *g) {
    const int32_t slot = blockIdx.y;
    if (slot >= active[0]) return;
    const int32_t e = active[1 + slot];
    const int32_t r0 = offsets[e], ne = offsets[e + 1] - r0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
    const int32_t j0 = (blockIdx.x * kWarps + warp) * 8 * kUpTiles;
    const int32_t vecs = d / 8;
    const uint4 *we = reinterpret_cast<const uint4 *>(w13) + static_cast<int64_t>(e) * 2 * F * vecs;
    const uint4 *wrow[kUpTiles][2];
#pragma unroll
    for (int m = 0; m < kUpTiles; ++m) {
        const int32_t j = j0 + 8 * m + gq;
        wrow[m][0] = we + static_cast<int64_t>(j) * vecs + 2 * t;
        wrow[m][1] = we + static_cast<int64_t>(F + j) * vecs + 2 * t;
    }
    const int32_t chunks = d / 64;
    for (int32_t p0 = 0; p0 < ne; p0 += 8 * NT) {
        const uint4 *xrow[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int32_t tok = min(p0 + 8 * n + gq, ne - 1);  // rows past the expert's: computed, not stored
            xrow[n] = reinterpret_cast<const uint4 *>(xp) + static_cast<int64_t>(r0 + tok) * vecs + 2 * t;
        }
        float acc[kUpTiles][NT][4];
#pragma unroll
        for (int m = 0; m < kUpTiles; ++m)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[m][n][v] = 0.f;
        for (int32_t c = 0; c < chunks; ++c) {
            uint4 wv[kUpTiles][2][2], xv[NT][2];
#pragma unroll
            for (int m = 0; m < kUpTiles; ++m)
#pragma unroll
                for (int u = 0; u < 2; ++u)
#pragma unroll
                    for (int h = 0; h < 2; ++h) wv[m][u][h] = load_stream(wrow[m][u] + c * 8 + h);
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    xv[n][h] = p0 + 8 * n < ne ? __ldg(xrow[n] + c * 8 + h) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int h = s / 2, q = 2 * (s % 2);
#pragma unroll
                for (int m = 0; m < kUpTiles; ++m)
#pragma unroll
                    for (int n = 0; n < NT; ++n)
                        if (p0 + 8 * n < ne)
                            mma16816(acc[m][n], word(wv[m][0][h], q), word(wv[m][1][h], q), word(wv[m][0][h], q + 1),
                                     word(wv[m][1][h], q + 1), word(xv[n][h], q), word(xv[n][h], q + 1));
            }
        }
        // c0, c1: gate of j for tokens 2t, 2t + 1; c2, c3: up of the same j.
#pragma unroll
        for (int m = 0; m < kUpTiles; ++m)
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int32_t j = j0 + 8 * m + gq, tok = p0 + 8 * n + 2 * t;
                if (tok < ne) g[static_cast<int64_t>(r0 + tok) * F + j] = f2bf(silu(acc[m][n][0]) * acc[m][n][2]);
                if (tok + 1 < ne)
                    g[static_cast<int64_t>(r0 + tok + 1) * F + j] = f2bf(silu(acc[m][n][1]) * acc[m][n][3]);
            }
    }
}

// grid (d / (kWarps * 64), kMoeStreamDownSplits, max_active). W2[e] is [F][d] (columns contiguous):
// lane (g, t) loads k rows 32c + 8t + [0, 8) at columns 8g + [0, 8) and pairs rows 2q, 2q + 1 per
// column with a byte permute; tile i takes columns 8g + 2i (its row g) and 8g + 2i + 1 (row g + 8).
template <int NT>
__global__ void __launch_bounds__(kWarps * 32)
    stream_down_kernel(const uint16_t *g, const uint16_t *w2, const int32_t *offsets, const int32_t *active,
                       int32_t d, int32_t F, int32_t n_rows, float *y) {
    const int32_t slot = blockIdx.z;
    if (slot >= active[0]) return;
    const int32_t e = active[1 + slot];
    const int32_t r0 = offsets[e], ne = offsets[e + 1] - r0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
    const int32_t n0 = (blockIdx.x * kWarps + warp) * 64;
    const int32_t vecs = d / 8, gvecs = F / 8;
    const int32_t chunks = F / 32, split = blockIdx.y;
    const int32_t c_begin = static_cast<int32_t>(static_cast<int64_t>(chunks) * split / kMoeStreamDownSplits);
    const int32_t c_end = static_cast<int32_t>(static_cast<int64_t>(chunks) * (split + 1) / kMoeStreamDownSplits);
    const uint4 *wbase = reinterpret_cast<const uint4 *>(w2) + static_cast<int64_t>(e) * F * vecs +
                         static_cast<int64_t>(8 * t) * vecs + (n0 / 8 + gq);
    float *yp = y + static_cast<int64_t>(split) * n_rows * d;
    for (int32_t p0 = 0; p0 < ne; p0 += 8 * NT) {
        const uint4 *grow[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int32_t tok = min(p0 + 8 * n + gq, ne - 1);
            grow[n] = reinterpret_cast<const uint4 *>(g) + static_cast<int64_t>(r0 + tok) * gvecs + t;
        }
        float acc[kDownTiles][NT][4];
#pragma unroll
        for (int i = 0; i < kDownTiles; ++i)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[i][n][v] = 0.f;
        for (int32_t c = c_begin; c < c_end; ++c) {
            uint4 rv[8], xv[NT];
            const uint4 *wc = wbase + static_cast<int64_t>(32 * c) * vecs;
#pragma unroll
            for (int r = 0; r < 8; ++r) rv[r] = load_stream(wc + static_cast<int64_t>(r) * vecs);
#pragma unroll
            for (int n = 0; n < NT; ++n) xv[n] = p0 + 8 * n < ne ? __ldg(grow[n] + 4 * c) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int qa = 2 * s, qb = 2 * s + 1;  // this step's two k pairs (rows 2q, 2q + 1)
#pragma unroll
                for (int i = 0; i < kDownTiles; ++i) {
                    const uint32_t a0 = __byte_perm(word(rv[2 * qa], i), word(rv[2 * qa + 1], i), 0x5410);
                    const uint32_t a1 = __byte_perm(word(rv[2 * qa], i), word(rv[2 * qa + 1], i), 0x7632);
                    const uint32_t a2 = __byte_perm(word(rv[2 * qb], i), word(rv[2 * qb + 1], i), 0x5410);
                    const uint32_t a3 = __byte_perm(word(rv[2 * qb], i), word(rv[2 * qb + 1], i), 0x7632);
#pragma unroll
                    for (int n = 0; n < NT; ++n)
                        if (p0 + 8 * n < ne) mma16816(acc[i][n], a0, a1, a2, a3, word(xv[n], qa), word(xv[n], qb));
                }
            }
        }
        // Tile i: c0, c1 at column 8g + 2i for tokens 2t, 2t + 1; c2, c3 at the next column.
#pragma unroll
        for (int i = 0; i < kDownTiles; ++i)
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int32_t col = n0 + 8 * gq + 2 * i, tok = p0 + 8 * n + 2 * t;
                if (tok < ne)
                    *reinterpret_cast<float2 *>(yp + static_cast<int64_t>(r0 + tok) * d + col) =
                        make_float2(acc[i][n][0], acc[i][n][2]);
                if (tok + 1 < ne)
                    *reinterpret_cast<float2 *>(yp + static_cast<int64_t>(r0 + tok + 1) * d + col) =
                        make_float2(acc[i][n][1], acc[i][n][3]);
            }
    }
}

template <int NT>
void launch(const bf16_t *xp, const bf16_t *w13, const bf16_t *w2, const int32_t *offsets, const int32_t *active,
            int32_t max_active, int32_t n_rows, int32_t d, int32_t F, bf16_t *g, float *y, cudaStream_t stream) {
    stream_up_kernel<NT><<<dim3(F / (kWarps * 8 * kUpTiles), max_active), kWarps * 32, 0, stream>>>(
        reinterpret_cast<const uint16_t *>(xp), reinterpret_cast<const uint16_t *>(w13), offsets, active, d, F,
        reinterpret_cast<uint16_t *>(g));
    DBRX_CUDA_LAUNCH_CHECK();
    stream_down_kernel<NT><<<dim3(d / (kWarps * 64), kMoeStreamDownSplits, max_active), kWarps * 32, 0, stream>>>(
        reinterpret_cast<const uint16_t *>(g), reinterpret_cast<const uint16_t *>(w2), offsets, active, d, F, n_rows,
        y);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool moe_stream_supported(int32_t d, int32_t ffn) {
    return d > 0 && ffn > 0 && d % (kWarps * 64) == 0 && ffn % (kWarps * 8 * kUpTiles) == 0;
}

void moe_experts_stream(const bf16_t *xp, const bf16_t *w13, const bf16_t *w2, const int32_t *offsets,
                        const int32_t *active, int32_t max_active, int32_t max_rows, int32_t n_rows, int32_t d,
                        int32_t ffn, bf16_t *g, float *y, cudaStream_t stream) {
    if (!moe_stream_supported(d, ffn))
        invalid_argument("moe_experts_stream: d_model " + std::to_string(d) + " / ffn " + std::to_string(ffn) +
                         " not multiples of 256 / 64");
    if (max_active == 0 || max_rows == 0) return;
    if (max_rows <= 8) launch<1>(xp, w13, w2, offsets, active, max_active, n_rows, d, ffn, g, y, stream);
    else if (max_rows <= 16) launch<2>(xp, w13, w2, offsets, active, max_active, n_rows, d, ffn, g, y, stream);
    else launch<4>(xp, w13, w2, offsets, active, max_active, n_rows, d, ffn, g, y, stream);
}

}  // namespace dbrx::cuda
