// Prefill attention on the tensor cores (flash attention, FA2-style): one block per (64-query
// tile of one sequence, query head). Each warp owns 16 query rows, so the online softmax is
// warp-local; S = Q K^T and O += P V run as bf16 WMMA with fp32 accumulation. K/V tiles of 64 keys
// are gathered from the paged cache through the block table, so a chunk attends to its cached
// prefix and to itself (causal) alike.
#include <mma.h>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace {

using namespace nvcuda;

constexpr int kBM = 64;  // queries per tile
constexpr int kBN = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// Rows are padded (by 16 bytes) so rows do not start in the same shared-memory bank.
template <int HD>
struct Smem {
    static constexpr int kQ = HD + 8, kS = kBN + 4, kP = kBN + 8, kO = HD + 4;
    __nv_bfloat16 q[kBM][kQ];
    __nv_bfloat16 k[kBN][kQ];
    __nv_bfloat16 v[kBN][kQ];
    float s[kWarps][16][kS];
    __nv_bfloat16 p[kWarps][16][kP];
    float o[kWarps][16][kO];
};

template <int HD>
__global__ void __launch_bounds__(kThreads)
    flash_prefill_kernel(const float *q, int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv, float scale,
                         uint16_t *out) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem<HD> &sm = *reinterpret_cast<Smem<HD> *>(smem_raw);
    const int32_t *tile = tiles + 4 * blockIdx.x;
    const int32_t sq = tile[0], tok0 = tile[1], n_rows = tile[2], pos0 = tile[3];
    const int32_t h = blockIdx.y, G = n_heads / kv.n_kv_heads, kvh = h / G, bs = kv.block_size;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int32_t *table = meta.blocks + meta.block_off[sq];

    // Q tile (scaled, bf16); padding rows are zero.
    for (int32_t i = threadIdx.x; i < kBM * HD; i += kThreads) {
        const int32_t r = i / HD, c = i % HD;
        const float v = r < n_rows ? q[(static_cast<int64_t>(tok0 + r) * n_heads + h) * HD + c] * scale : 0.f;
        sm.q[r][c] = __float2bfloat16_rn(v);
    }
    for (int32_t i = lane; i < 16 * HD; i += 32) sm.o[warp][i / HD][i % HD] = 0.f;
    // Lane pair (2r, 2r+1) owns row r of this warp's 16 rows, half the columns each; each lane starts
    // its column walk at its own offset so the 32 lanes hit 32 different banks.
    const int32_t row = lane / 2, half = lane % 2;
    const int32_t stagger = 2 * half + row / 8;
    using S = Smem<HD>;
    const int32_t qrow = warp * 16 + row;
    const int32_t qpos = pos0 + min(qrow, n_rows - 1);
    float m = -INFINITY, l = 0.f;
    const int32_t last = pos0 + n_rows - 1;
    const int32_t n_kt = last / kBN + 1;
    const int32_t warp_last = pos0 + min(warp * 16 + 15, n_rows - 1);  // this warp's last query position

    for (int32_t kt = 0; kt < n_kt; ++kt) {
        const int32_t key0 = kt * kBN;
        __syncthreads();  // previous tile's K/V no longer read
        constexpr int kVecs = HD / 8;
        for (int32_t i = threadIdx.x; i < kBN * kVecs; i += kThreads) {
            const int32_t r = i / kVecs, c = i % kVecs, j = key0 + r;
            uint4 kk = make_uint4(0, 0, 0, 0), vv = kk;
            if (j <= last) {
                const int64_t off = table[j / bs] * kv.block_stride + (static_cast<int64_t>(j % bs) * kv.n_kv_heads + kvh) * HD;
                kk = *reinterpret_cast<const uint4 *>(kv.base + off + c * 8);
                vv = *reinterpret_cast<const uint4 *>(kv.base + off + kv.v_offset + c * 8);
            }
            *reinterpret_cast<uint4 *>(&sm.k[r][c * 8]) = kk;
            *reinterpret_cast<uint4 *>(&sm.v[r][c * 8]) = vv;
        }
        __syncthreads();
        if (key0 > warp_last) continue;  // every key of this tile is in this warp's future

        // S = Q_w K^T: 16 x 64.
#pragma unroll
        for (int n = 0; n < kBN / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
                wmma::load_matrix_sync(a, &sm.q[warp * 16][kk * 16], S::kQ);
                wmma::load_matrix_sync(b, &sm.k[n * 16][kk * 16], S::kQ);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(&sm.s[warp][0][n * 16], acc, S::kS, wmma::mem_row_major);
        }
        __syncwarp();
        // Online softmax on this lane's half row.
        float mx = -INFINITY;
        for (int i = 0; i < 32; ++i) {
            const int c = half * 32 + (i + stagger) % 32;
            const float s = key0 + c <= qpos ? sm.s[warp][row][c] : -INFINITY;
            mx = fmaxf(mx, s);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_new = fmaxf(m, mx);
        const float corr = __expf(m - m_new);
        float sum = 0.f;
        for (int i = 0; i < 32; ++i) {
            const int c = half * 32 + (i + stagger) % 32;
            const float p = key0 + c <= qpos ? __expf(sm.s[warp][row][c] - m_new) : 0.f;
            sum += p;
            sm.p[warp][row][c] = __float2bfloat16_rn(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * corr + sum;
        m = m_new;
        if (corr != 1.f)
            for (int j = 0; j < HD / 2; ++j) sm.o[warp][row][half * (HD / 2) + (j + stagger) % (HD / 2)] *= corr;
        __syncwarp();
        // O_w += P_w V: 16 x HD.
#pragma unroll
        for (int n = 0; n < HD / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, &sm.o[warp][0][n * 16], S::kO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < kBN / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
                wmma::load_matrix_sync(a, &sm.p[warp][0][kk * 16], S::kP);
                wmma::load_matrix_sync(b, &sm.v[kk * 16][n * 16], S::kQ);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(&sm.o[warp][0][n * 16], acc, S::kO, wmma::mem_row_major);
        }
        __syncwarp();
    }
    if (qrow < n_rows) {
        const float inv = 1.f / l;
        uint16_t *dst = out + (static_cast<int64_t>(tok0 + qrow) * n_heads + h) * HD;
        for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) dst[c] = f2bf(sm.o[warp][row][c] * inv);
    }
}

template <int HD>
void launch(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv,
            uint16_t *out, cudaStream_t stream) {
    const size_t smem = sizeof(Smem<HD>);
    static std::atomic<uint32_t> smem_set{0};
    allow_max_dynamic_smem(reinterpret_cast<const void *>(flash_prefill_kernel<HD>), smem_set);
    const float scale = 1.0f / sqrtf(static_cast<float>(HD));
    flash_prefill_kernel<HD><<<dim3(n_tiles, n_heads), kThreads, smem, stream>>>(q, n_heads, tiles, meta, kv, scale, out);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool flash_prefill_supported(int32_t head_dim) {
    return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

void flash_prefill(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv,
                   bf16_t *out, cudaStream_t stream) {
    if (n_tiles == 0) return;
    switch (kv.head_dim) {
    case 16: launch<16>(q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    case 32: launch<32>(q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    case 64: launch<64>(q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    case 128: launch<128>(q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    default: invalid_argument("flash_prefill: head_dim " + std::to_string(kv.head_dim) + " not supported");
    }
}

}  // namespace dbrx::cuda
