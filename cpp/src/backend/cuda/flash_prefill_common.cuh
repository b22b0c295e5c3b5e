// Pieces shared by the two prefill flash-attention kernels (flash_prefill_kernel.cuh on mma.sync,
// flash_prefill_wgmma_kernel.cuh on wgmma) and their host sides: which tile and head a CTA owns, the
// Q tile load, the lazy-max slack of the online softmax and the launch.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/mma_ptx.cuh"

namespace dbrx::cuda::flash_common {

// Running-max slack in log2 units: exponentials are taken against a max at most this stale, so P
// stays <= 2^8 and O is rescaled rarely once a row's max settles.
constexpr float kLazy = 8.f;

// The query rows and keys of one CTA: tile blockIdx.x / n_heads (taken in reverse, so the latest,
// heaviest causal tiles start first) of head blockIdx.x % n_heads (heads fastest, so the query heads
// of one KV group run side by side and share K/V through L2).
struct TileWork {
    int32_t h, sqn, tok0, n_rows, pos0;
    int32_t kvh, bs;        // KV head, keys per cache block
    const int32_t *table;   // the sequence's block table
    int32_t last, n_kt;     // the tile's last key position, key tiles of BN keys up to it
};
template <int BN>
__device__ __forceinline__ TileWork tile_work(int32_t n_heads, int32_t n_tiles, const int32_t *tiles,
                                              const TokenMeta &meta, const KvLayer &kv) {
    TileWork w;
    w.h = static_cast<int32_t>(blockIdx.x % n_heads);
    const int32_t *tile = tiles + 4 * (n_tiles - 1 - static_cast<int32_t>(blockIdx.x / n_heads));
    w.sqn = tile[0], w.tok0 = tile[1], w.n_rows = tile[2], w.pos0 = tile[3];
    w.kvh = w.h / (n_heads / kv.n_kv_heads), w.bs = kv.block_size;
    w.table = meta.blocks + meta.block_off[w.sqn];
    w.last = w.pos0 + w.n_rows - 1;
    w.n_kt = w.last / BN + 1;
    return w;
}

// Q rows tok0 .. tok0 + n_rows - 1 of head h: fp32 -> scaled bf16, 8 values per 16-byte store at
// dst(r, c) (row r of the tile, 8-column chunk c); rows past n_rows are zero. Unrolled so that the
// loads are in flight together.
template <int HD, int BM, int NT, class Dst>
__device__ __forceinline__ void load_q_tile(const float *q, int32_t n_heads, int32_t h, int32_t tok0, int32_t n_rows,
                                            float qscale, int tid, Dst dst) {
    constexpr int kVecs = HD / 8;
    static_assert(BM * kVecs % NT == 0);
#pragma unroll
    for (int it = 0; it < BM * kVecs / NT; ++it) {
        const int i = tid + it * NT, r = i / kVecs, c = i % kVecs;
        uint4 w = make_uint4(0, 0, 0, 0);
        if (r < n_rows) {
            const float4 *src =
                reinterpret_cast<const float4 *>(q + (static_cast<int64_t>(tok0 + r) * n_heads + h) * HD + c * 8);
            const float4 a = __ldg(src), b = __ldg(src + 1);
            w = make_uint4(pack_bf16(a.x * qscale, a.y * qscale), pack_bf16(a.z * qscale, a.w * qscale),
                           pack_bf16(b.x * qscale, b.y * qscale), pack_bf16(b.z * qscale, b.w * qscale));
        }
        *dst(r, c) = w;
    }
}

// The signature both kernels share.
using Kernel = void (*)(const float *, int32_t, int32_t, const int32_t *, TokenMeta, KvLayer, float, uint16_t *);
// The host side of every variant.
using Launch = void (*)(const float *, int32_t, int32_t, const int32_t *, TokenMeta, KvLayer, bf16_t *, cudaStream_t);

// One CTA per (tile, query head) of C's kernel; `what` names the caller in errors. smem_set: the
// kernel's once-per-device flags of allow_max_dynamic_smem.
template <class C>
void launch(const char *what, Kernel kernel, std::atomic<uint32_t> &smem_set, const float *q, int32_t n_tiles,
            int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv, bf16_t *out, cudaStream_t stream) {
    check_kv_layer(kv, what);
    allow_max_dynamic_smem(reinterpret_cast<const void *>(kernel), smem_set);
    // log2(e) folded into the softmax scale: the kernels exponentiate with exp2.
    const float qscale = 1.4426950408889634f / std::sqrt(static_cast<float>(C::kHd));
    const int64_t blocks = static_cast<int64_t>(n_tiles) * n_heads;
    if (blocks > 0x7fffffff) invalid_argument(std::string(what) + ": " + std::to_string(blocks) + " blocks in one launch");
    kernel<<<static_cast<uint32_t>(blocks), C::kThreads, C::kSmem, stream>>>(q, n_heads, n_tiles, tiles, meta, kv,
                                                                              qscale, out);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace dbrx::cuda::flash_common
