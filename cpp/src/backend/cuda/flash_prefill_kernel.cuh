// The prefill flash-attention kernel (FlashAttention-2 on mma.sync.m16n8k16 bf16), templated on
// the head dim and the CTA shape. One CTA computes one tile of kBM query rows of one head:
//   - Q (scaled by log2(e) / sqrt(hd), bf16) in shared memory, or in registers when a warp owns 16 rows;
//   - K/V tiles of kBN keys gathered from the paged cache with cp.async (16-byte chunks), kStages deep;
//     the block-table entries of a tile are fetched one iteration ahead into shared memory, so no
//     warp waits on a global load before issuing its copies;
//   - S = Q K^T, the online softmax state and O live in registers; P becomes the A operand of P V
//     without a shared-memory round trip; exp2 throughout; masks only on tiles crossing the diagonal;
//     a row's running max moves only when a tile exceeds it by more than 2^kLazy (P stays <= 2^8),
//     so O is rescaled rarely once the max settles.
// Shared-memory rows are padded by 16 bytes, so ldmatrix's 8 row addresses hit 8 different bank groups
// at every head dim.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/flash_prefill_common.cuh"
#include "backend/cuda/kernels.h"
#include "backend/cuda/mma_ptx.cuh"

namespace dbrx::cuda::flash {

template <int HD, int W, int MT, int STAGES, int MINB = 1, int BN = 64>
struct Cfg {
    static constexpr int kHd = HD;
    static constexpr int kWarps = W;
    static constexpr int kMt = MT;  // 16-row m-tiles per warp
    static constexpr int kStages = STAGES;
    static constexpr int kBM = W * 16 * MT;
    static constexpr int kBN = BN;
    static constexpr int kThreads = 32 * W;
    static constexpr int kLd = HD + 8;  // bf16 per shared-memory row
    static constexpr int kMinBlocks = MINB;  // CTAs per SM the registers are capped for
    // Q fragments stay in registers only where registers are not capped for 2 CTAs per SM.
    static constexpr bool kQRegs = MT == 1 && MINB == 1;
    static constexpr size_t kSmem = static_cast<size_t>(kBM + 2 * STAGES * kBN) * kLd * 2;
    static_assert(kBM == kFlashTile, "a CTA covers exactly one tile of the backend");
    static_assert(HD % 16 == 0 && BN % 16 == 0 && BN <= kThreads && STAGES >= 2);
};

template <class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    flash_prefill_kernel(const float *__restrict__ q, int32_t n_heads, int32_t n_tiles, const int32_t *__restrict__ tiles,
                         TokenMeta meta, KvLayer kv, float qscale, uint16_t *__restrict__ out) {
    constexpr int HD = C::kHd, BN = C::kBN, BM = C::kBM, LD = C::kLd, NT = C::kThreads, MT = C::kMt;
    constexpr int ST = C::kStages;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __nv_bfloat16 *sq = reinterpret_cast<__nv_bfloat16 *>(smem_raw);
    __nv_bfloat16 *sk = sq + BM * LD;  // [ST][BN][LD]
    __nv_bfloat16 *sv = sk + ST * BN * LD;

    const flash_common::TileWork tw = flash_common::tile_work<BN>(n_heads, n_tiles, tiles, meta, kv);
    const int32_t h = tw.h, tok0 = tw.tok0, n_rows = tw.n_rows, pos0 = tw.pos0, kvh = tw.kvh, bs = tw.bs;
    const int32_t *table = tw.table;
    const int32_t last = tw.last, n_kt = tw.n_kt;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    // Cache offset (K side) of each key of a tile, published one iteration before the tile's copies
    // (the table lookup and the offset arithmetic stay off the copy loop).
    __shared__ int64_t kmap[2][BN];
    auto key_place = [&](int32_t j) -> int64_t { return j <= last ? kv_offset(kv, table[j / bs], j % bs, kvh) : 0; };
    // K/V tile kt -> stage st, key r of the tile at place(r). Keys past `last` are zero-filled (they
    // are masked, and zero V keeps 0 * V finite).
    auto load_kv = [&](int32_t kt, int st, auto place) {
        constexpr int kChunks = HD / 8, kTotal = BN * kChunks;
#pragma unroll
        for (int it = 0; it < (kTotal + NT - 1) / NT; ++it) {
            const int i = tid + it * NT;
            if (kTotal % NT != 0 && i >= kTotal) break;
            const int r = i / kChunks, c = i % kChunks;
            const int32_t j = kt * BN + r;
            const bool valid = j <= last;
            const uint16_t *src = valid ? kv.base + place(r) + c * 8 : kv.base;
            const int so = (st * BN + r) * LD + c * 8;
            cp_async16(smem_u32(sk + so), src, valid);
            cp_async16(smem_u32(sv + so), valid ? src + kv.v_offset : src, valid);
        }
    };
#pragma unroll
    for (int s = 0; s < ST - 1; ++s) {
        if (s < n_kt) load_kv(s, s, [&](int r) { return key_place(s * BN + r); });
        cp_commit();
    }
    if (tid < BN) kmap[(ST - 1) % 2][tid] = key_place((ST - 1) * BN + tid);

    // Q: fp32 -> scaled bf16; rows past n_rows are zero.
    flash_common::load_q_tile<HD, BM, NT>(q, n_heads, h, tok0, n_rows, qscale, tid,
                                          [&](int r, int c) { return reinterpret_cast<uint4 *>(sq + r * LD + c * 8); });
    __syncthreads();

    const int row0 = warp * 16 * MT;  // this warp's first row in the tile
    const int g = lane / 4, q4 = lane % 4;
    const uint32_t q_lane = smem_u32(sq) + ((row0 + lane % 16) * LD + (lane / 16) * 8) * 2;
    const uint32_t k_lane = smem_u32(sk) + (((lane / 16) * 8 + lane % 8) * LD + ((lane / 8) % 2) * 8) * 2;
    const uint32_t v_lane = smem_u32(sv) + ((((lane / 8) % 2) * 8 + lane % 8) * LD + (lane / 16) * 8) * 2;
    uint32_t qf[C::kQRegs ? HD / 16 : 1][4];
    if constexpr (C::kQRegs) {
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) ldsm_x4(q_lane + ks * 32, qf[ks]);
    }

    const bool warp_active = row0 < n_rows;
    const int32_t warp_first = pos0 + row0;
    const int32_t warp_last = pos0 + min(row0 + 16 * MT - 1, n_rows - 1);
    float o[MT][HD / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.f;
    }

    for (int32_t kt = 0; kt < n_kt; ++kt) {
        cp_wait<ST - 2>();
        __syncthreads();  // tile kt landed for everyone; tile kt-1's stage is free
        {
            const int32_t nk = kt + ST - 1;
            const int64_t *km = kmap[nk % 2];
            if (nk < n_kt) load_kv(nk, nk % ST, [&](int r) { return km[r]; });
            cp_commit();
        }
        // The next tile's block-table entries: loaded now, stored after the math hides the latency.
        const int64_t next_place = tid < BN ? key_place((kt + ST) * BN + tid) : 0;
        const int32_t key0 = kt * BN;
        if (warp_active && key0 <= warp_last) {  // else all keys are in this warp's future
            const uint32_t kst = k_lane + (kt % ST) * BN * LD * 2, vst = v_lane + (kt % ST) * BN * LD * 2;

            // S = Q K^T (16*MT x BN per warp).
            float s[MT][BN / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
                uint32_t a[MT][4];
                if constexpr (C::kQRegs) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) a[0][i] = qf[ks][i];
                } else {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) ldsm_x4(q_lane + (mt * 16 * LD + ks * 16) * 2, a[mt]);
                }
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    uint32_t b[4];
                    ldsm_x4(kst + (np * 16 * LD + ks * 16) * 2, b);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(s[mt][2 * np], a[mt], b[0], b[1]);
                        mma_bf16(s[mt][2 * np + 1], a[mt], b[2], b[3]);
                    }
                }
            }
            // Causal mask, only where the tile crosses this warp's diagonal.
            if (key0 + BN - 1 > warp_first) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int32_t key = key0 + n * 8 + 2 * q4 + (e & 1);
                            const int32_t qp = warp_first + mt * 16 + g + (e >> 1) * 8;
                            if (key > qp) s[mt][n][e] = -INFINITY;
                        }
            }
            // Online softmax (base 2); each row's 4 owners are one lane quad.
            float corr[MT][2];
            bool rescale = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    float mx = m[mt][hr];
#pragma unroll
                    for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * hr], s[mt][n][2 * hr + 1]));
                    mx = quad_max(mx);
                    const float m_new = mx > m[mt][hr] + flash_common::kLazy ? mx : m[mt][hr];  // first tile: m = -inf
                    corr[mt][hr] = ex2(m[mt][hr] - m_new);
                    rescale |= corr[mt][hr] != 1.f;
                    m[mt][hr] = m_new;
                    mx = m_new;
                    float sum = 0.f;
#pragma unroll
                    for (int n = 0; n < BN / 8; ++n) {
                        s[mt][n][2 * hr] = ex2(s[mt][n][2 * hr] - mx);
                        s[mt][n][2 * hr + 1] = ex2(s[mt][n][2 * hr + 1] - mx);
                        sum += s[mt][n][2 * hr] + s[mt][n][2 * hr + 1];
                    }
                    l[mt][hr] = l[mt][hr] * corr[mt][hr] + sum;
                }
            if (__any_sync(0xffffffffu, rescale))
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int n = 0; n < HD / 8; ++n) {
                        o[mt][n][0] *= corr[mt][0];
                        o[mt][n][1] *= corr[mt][0];
                        o[mt][n][2] *= corr[mt][1];
                        o[mt][n][3] *= corr[mt][1];
                    }
            // O += P V: P's accumulator layout is the A fragment layout of the next mma.
#pragma unroll
            for (int ks = 0; ks < BN / 16; ++ks) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = pack_bf16(s[mt][2 * ks][0], s[mt][2 * ks][1]);
                    a[mt][1] = pack_bf16(s[mt][2 * ks][2], s[mt][2 * ks][3]);
                    a[mt][2] = pack_bf16(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
                    a[mt][3] = pack_bf16(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
                }
#pragma unroll
                for (int np = 0; np < HD / 16; ++np) {
                    uint32_t b[4];
                    ldsm_x4_trans(vst + (ks * 16 * LD + np * 16) * 2, b);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(o[mt][2 * np], a[mt], b[0], b[1]);
                        mma_bf16(o[mt][2 * np + 1], a[mt], b[2], b[3]);
                    }
                }
            }
        }
        if (tid < BN) kmap[(kt + ST) % 2][tid] = next_place;
    }
    cp_wait<0>();

    // O / l -> bf16 rows of `out`.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const float sum = quad_sum(l[mt][hr]);
            const int r = row0 + mt * 16 + g + hr * 8;
            if (r >= n_rows) continue;
            const float inv = 1.f / sum;
            uint32_t *dst = reinterpret_cast<uint32_t *>(out + (static_cast<int64_t>(tok0 + r) * n_heads + h) * HD + 2 * q4);
#pragma unroll
            for (int n = 0; n < HD / 8; ++n) dst[n * 4] = pack_bf16(o[mt][n][2 * hr] * inv, o[mt][n][2 * hr + 1] * inv);
        }
}

}  // namespace dbrx::cuda::flash
