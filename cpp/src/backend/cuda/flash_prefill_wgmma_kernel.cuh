// The Hopper prefill flash-attention kernel (FlashAttention-3 style, sm_90a wgmma), head dim 128.
// One CTA computes one tile of 128 query rows of one head with two warpgroups of 64 rows each:
//   - Q (scaled by log2(e) / sqrt(hd), bf16) in shared memory, the A operand of S = Q K^T;
//   - K and V tiles of kBN keys gathered from the paged cache with cp.async by all 256 threads, kStages
//     deep, into the 128-byte-swizzled layout wgmma reads (each 64-column half of a tile is a column of
//     8-row x 128-byte swizzle atoms); K is the K-major B operand of S = Q K^T, V the N-major
//     (transposed) B operand of O += P V, with P from registers (the accumulator layout of S is the A
//     fragment layout of the second GEMM);
//   - software pipelining inside each warpgroup: iteration j issues S_j = Q K_j^T and O += P_{j-1}
//     V_{j-1} back to back, then runs the softmax of S_j while P_{j-1} V_{j-1} is still on the tensor
//     cores. A load group therefore holds K_j with V_{j-1}, so the stage a copy overwrites is never
//     one an in-flight wgmma reads;
//   - the online softmax of the mma.sync kernel (exp2, lazy max with slack kLazy, masks only on tiles
//     crossing a warpgroup's diagonal).
// No mbarrier and no spin loop: cp.async groups, __syncthreads and wgmma.wait_group only, and every
// loop is bounded by the tile's key count, so a bad input cannot hang the kernel.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/flash_prefill_common.cuh"
#include "backend/cuda/kernels.h"
#include "backend/cuda/mma_ptx.cuh"

namespace dbrx::cuda::wgfa {

template <int BN, int ST>
struct Cfg {
    static constexpr int kHd = 128;
    static constexpr int kBM = 128;
    static constexpr int kBN = BN;
    static constexpr int kStages = ST;
    static constexpr int kThreads = 256;  // two consumer warpgroups
    static constexpr uint32_t kQBytes = kBM * kHd * 2;
    static constexpr uint32_t kTileBytes = BN * kHd * 2;  // one K or V tile
    static constexpr int kRing = 4;                        // key tiles whose cache offsets are kept
    // +1024: the kernel aligns the dynamic shared memory to a swizzle atom (1024 bytes) itself.
    static constexpr size_t kSmem = 1024 + kQBytes + 2 * ST * size_t{kTileBytes} + kRing * BN * sizeof(int64_t);
    static_assert(kBM == kFlashTile, "a CTA covers exactly one tile of the backend");
    static_assert((BN == 64 || BN == 128) && ST >= 2 && kSmem <= 227 * 1024);
};

// Byte offset of 16-byte chunk c (0..15) of row r in a [rows][128] bf16 tile stored as two column halves
// of 128-byte rows, swizzled as wgmma's 128-byte mode expects (chunk bits ^= row bits mod 8).
__device__ __forceinline__ uint32_t swz(int rows, int r, int c) {
    return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}
// Shared-memory matrix descriptor, 128-byte swizzle. lbo: byte distance between swizzle atoms along
// the strided-in-memory dimension of an N-major operand (ignored for K-major); sbo: between 8-row groups.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
           (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// 16 bytes global -> shared, bypassing L1; zero-filled (src not read) when `zero`. The ignore-src
// predicate form, unlike mma_ptx.cuh's cp_async16 (src-size operand).
__device__ __forceinline__ void cp_async16_or_zero(uint32_t dst, const void *src, bool zero) {
    asm volatile("{\n.reg .pred z;\nsetp.ne.b32 z, %2, 0;\ncp.async.cg.shared.global [%0], [%1], 16, z;\n}\n" ::"r"(dst),
                 "l"(src), "r"(static_cast<int>(zero)));
}
// Generic-proxy writes (st.shared, cp.async) made visible to the async proxy (wgmma operand reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// True in all 128 threads of warpgroup wg when `v` is true in any of them (named barrier 1 + wg; 0 is
// __syncthreads'). A branch around wgmma.wait_group must be uniform over the warpgroup (.aligned), so
// a per-warp vote (__any_sync) cannot steer one.
__device__ __forceinline__ bool warpgroup_any(bool v, int wg) {
    uint32_t r;
    asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, 128, p;\nselp.u32 %0, 1, 0, q;\n}\n"
                 : "=r"(r)
                 : "r"(static_cast<uint32_t>(v)), "r"(1 + wg)
                 : "memory");
    return r != 0;
}
// Keeps the compiler from moving accesses of an accumulator across a wgmma issue or wait.
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D (+)= A * B, m64n64k16: A (64x16) and B (64x16, K-major) from shared memory; scale_d = 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}

// D (+)= A * B, m64n128k16: A (64x16) and B (128x16, K-major) from shared memory; scale_d = 0 overwrites D.
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}

// D += A * B, m64n128k16: A (64x16) from registers (the m16n8k16 A fragment of each warp), B (16 keys x
// 128, N-major, i.e. transposed) from shared memory.
__device__ __forceinline__ void wgmma_rs_n128_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}


template <int BN> __device__ __forceinline__ void wgmma_s(float (&s)[BN / 2], uint64_t da, uint64_t db, int scale_d) {
    if constexpr (BN == 128) wgmma_ss_n128(s, da, db, scale_d);
    else wgmma_ss_n64(s, da, db, scale_d);
}

template <class C>
__global__ void __launch_bounds__(C::kThreads, 1)
    flash_wgmma_kernel(const float *__restrict__ q, int32_t n_heads, int32_t n_tiles, const int32_t *__restrict__ tiles,
                       TokenMeta meta, KvLayer kv, float qscale, uint16_t *__restrict__ out) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int HD = C::kHd, BN = C::kBN, BM = C::kBM, ST = C::kStages, NT = C::kThreads;
    constexpr uint32_t TB = C::kTileBytes;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sq = (raw + 1023u) & ~1023u;  // swizzle atoms must be 1024-byte aligned
    unsigned char *const gq = smem_raw + (sq - raw);
    const uint32_t sk = sq + C::kQBytes, sv = sk + ST * TB;  // [ST] K tiles, [ST] V tiles

    const flash_common::TileWork tw = flash_common::tile_work<BN>(n_heads, n_tiles, tiles, meta, kv);
    const int32_t h = tw.h, tok0 = tw.tok0, n_rows = tw.n_rows, pos0 = tw.pos0, kvh = tw.kvh, bs = tw.bs;
    const int32_t *table = tw.table;
    const int32_t last = tw.last, n_kt = tw.n_kt;
    const int tid = threadIdx.x;

    // Cache offsets (bytes, K side) of the keys of tile t in ring slot t % kRing, -1 past `last`.
    // Thread tid < BN computes key tid of a tile one iteration before the tile's copies are issued
    // (the table lookup and its division stay off the copy path); the slot a thread writes is neither
    // of the two read in that iteration (K tile j + ST - 1, V tile j + ST - 2, writing j + ST).
    int64_t *const ring = reinterpret_cast<int64_t *>(gq + C::kQBytes + 2 * ST * TB);  // [kRing][BN]
    auto key_off = [&](int32_t t) -> int64_t {
        const int32_t j = t * BN + tid;
        if (tid >= BN || j > last) return -1;
        return 2 * kv_offset(kv, __ldg(table + j / bs), j % bs, kvh);
    };
    // Thread tid copies 16-byte chunk tid % 16 of rows tid / 16 + 16 it of a tile; the swizzle of
    // those rows is the same (row mod 8 is), so their shared addresses step by 16 rows.
    constexpr int kRowsPerPass = NT / (HD / 8);
    static_assert(BN % kRowsPerPass == 0 && kRowsPerPass % 8 == 0);
    const uint32_t dst_lane = swz(BN, tid / 16, tid % 16);
    const char *const k_lane = reinterpret_cast<const char *>(kv.base + (tid % 16) * 8);
    const char *const v_lane = reinterpret_cast<const char *>(kv.base + kv.v_offset + (tid % 16) * 8);
    // Key tile kt (K from k_lane, V from v_lane) -> the swizzled tile at dst. Keys past `last` are
    // zero-filled: they are masked, and zero V keeps 0 * V finite.
    auto load_tile = [&](int32_t kt, uint32_t dst, const char *lane_base) {
        const int64_t *offs = ring + (kt % C::kRing) * BN + tid / 16;
#pragma unroll
        for (int it = 0; it < BN / kRowsPerPass; ++it) {
            const int64_t off = offs[it * kRowsPerPass];
            cp_async16_or_zero(dst + dst_lane + it * kRowsPerPass * 128, lane_base + (off < 0 ? 0 : off), off < 0);
        }
    };
    // Load group g: K tile g and V tile g-1 (see the header comment), always committed, empty or not.
    auto load_group = [&](int32_t g) {
        if (g < n_kt) load_tile(g, sk + (g % ST) * TB, k_lane);
        if (g >= 1 && g <= n_kt) load_tile(g - 1, sv + ((g - 1) % ST) * TB, v_lane);
        cp_commit();
    };
    static_assert(ST <= C::kRing, "the prologue fills ring slots 0 .. ST - 1");
    if (tid < BN) {
#pragma unroll
        for (int t = 0; t < ST; ++t) ring[t * BN + tid] = key_off(t);
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < ST - 1; ++g) load_group(g);

    // Q: fp32 -> scaled bf16, swizzled; rows past n_rows are zero.
    flash_common::load_q_tile<HD, BM, NT>(q, n_heads, h, tok0, n_rows, qscale, tid,
                                          [&](int r, int c) { return reinterpret_cast<uint4 *>(gq + swz(BM, r, c)); });

    // Warpgroup wg owns rows [64 wg, 64 wg + 64) of the tile; warp w of it rows 16 w.., as in m16n8 tiles.
    // Broadcast from lane 0 so that ptxas sees the warpgroup's branches around wgmma as uniform (it
    // serializes wgmma issued on paths it cannot prove non-divergent).
    const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
    const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, q4 = lane % 4;
    const int wrow0 = wg * 64;
    const int32_t wg_first = pos0 + wrow0;
    const int32_t wg_last = pos0 + min(wrow0 + 63, n_rows - 1);
    // Key tiles this warpgroup needs.
    const int32_t n_wg = __shfl_sync(0xffffffffu, wrow0 < n_rows ? wg_last / BN + 1 : 0, 0);
    const int32_t qp0 = wg_first + warp * 16 + g;                 // this thread's rows: qp0, qp0 + 8

    float o[64], s[BN / 2];
    uint32_t p[BN / 16][4];
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;

    auto issue_s = [&](int32_t j) {
        const uint32_t kst = sk + (j % ST) * TB;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks)
            wgmma_s<BN>(s, make_desc(sq + (ks >> 2) * (BM * 128) + wrow0 * 128 + (ks & 3) * 32, 16, 1024),
                        make_desc(kst + (ks >> 2) * (BN * 128) + (ks & 3) * 32, 16, 1024), ks > 0);
        wgmma_commit();
    };
    auto issue_pv = [&](int32_t j) {  // O += P_{j-1} V_{j-1}
        const uint32_t vst = sv + ((j - 1) % ST) * TB;
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) wgmma_rs_n128_tb(o, p[ks], make_desc(vst + ks * 16 * 128, BN * 128, 1024));
        wgmma_commit();
    };
    // Mask and online softmax of S_j (base 2; each row's 4 owners are one lane quad): S becomes P_j in
    // fp32, corr the factor O must take. True when some row's max moved.
    auto softmax = [&](int32_t j, float (&corr)[2]) {
        const int32_t key0 = j * BN;
        if (key0 + BN - 1 > wg_first) {  // causal mask, only on tiles crossing the diagonal
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (key0 + n * 8 + 2 * q4 + (e & 1) > qp0 + (e >> 1) * 8) s[n * 4 + e] = -INFINITY;
        }
        bool moved = false;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = m[hr];
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n * 4 + 2 * hr], s[n * 4 + 2 * hr + 1]));
            mx = quad_max(mx);
            // Key 0 is in every row's first tile, so the max is finite from the first tile on.
            const float m_new = mx > m[hr] + flash_common::kLazy ? mx : m[hr];
            corr[hr] = ex2(m[hr] - m_new);
            moved |= corr[hr] != 1.f;
            m[hr] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
                s[n * 4 + 2 * hr] = ex2(s[n * 4 + 2 * hr] - m_new);
                s[n * 4 + 2 * hr + 1] = ex2(s[n * 4 + 2 * hr + 1] - m_new);
                sum += s[n * 4 + 2 * hr] + s[n * 4 + 2 * hr + 1];
            }
            l[hr] = l[hr] * corr[hr] + sum;
        }
        return __any_sync(0xffffffffu, moved);
    };
    auto rescale_o = [&](const float (&corr)[2]) {
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            o[n * 4] *= corr[0];
            o[n * 4 + 1] *= corr[0];
            o[n * 4 + 2] *= corr[1];
            o[n * 4 + 3] *= corr[1];
        }
    };
    auto pack_p = [&] {  // the accumulator layout of S is the A fragment layout of P V
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) {
            p[ks][0] = pack_bf16(s[8 * ks], s[8 * ks + 1]);
            p[ks][1] = pack_bf16(s[8 * ks + 2], s[8 * ks + 3]);
            p[ks][2] = pack_bf16(s[8 * ks + 4], s[8 * ks + 5]);
            p[ks][3] = pack_bf16(s[8 * ks + 6], s[8 * ks + 7]);
        }
    };

    // Iteration j: S_j = Q K_j^T (j < n_wg) and O += P_{j-1} V_{j-1} (1 <= j <= n_wg); n_kt + 1 in all.
    // Each case issues and retires its own wgmma groups, so ptxas sees no path on which an accumulator
    // is touched while a wgmma writing it may be in flight.
    for (int32_t j = 0; j <= n_kt; ++j) {
        cp_wait<ST - 2>();  // this thread's copies of group j landed
        fence_proxy_async();
        __syncthreads();  // everyone's did; the stages group j + ST - 1 overwrites are no longer read
        const int64_t next_off = key_off(j + ST);  // stored at the end, its latency hidden by the math
        float corr[2];
        if (j >= 1 && j < n_wg) {  // steady state: the softmax of S_j overlaps P_{j-1} V_{j-1}
            fence_regs(o);
            wgmma_fence();
            issue_s(j);
            issue_pv(j);
            load_group(j + ST - 1);  // the copies are issued while the tensor cores work
            wgmma_wait<1>();
            fence_regs(s);
            // The wait sits in both arms of a branch on the softmax's result, so that ptxas cannot
            // schedule it (and the stall on P V) ahead of the softmax. The branch is voted over the
            // warpgroup: with a per-warp vote, a warp whose rows' max moved past the lazy slack (say
            // the real rows of a short tile, its other warps holding padding) ran a different
            // wgmma.wait_group than its siblings, which .aligned leaves undefined.
            if (warpgroup_any(softmax(j, corr), wg)) {
                wgmma_wait<0>();
                fence_regs(o);
                rescale_o(corr);
            } else {
                wgmma_wait<0>();
                fence_regs(o);
            }
            pack_p();
        } else if (j == 0 && n_wg > 0) {  // first tile: S only (O is zero, so no rescale)
            wgmma_fence();
            issue_s(j);
            load_group(j + ST - 1);
            wgmma_wait<0>();
            fence_regs(s);
            softmax(j, corr);
            pack_p();
        } else if (j >= 1 && j == n_wg) {  // last P V of this warpgroup
            fence_regs(o);
            wgmma_fence();
            issue_pv(j);
            load_group(j + ST - 1);
            wgmma_wait<0>();
            fence_regs(o);
        } else {  // past this warpgroup's diagonal: only its share of the copies
            load_group(j + ST - 1);
        }
        if (tid < BN) ring[((j + ST) % C::kRing) * BN + tid] = next_off;
    }
    cp_wait<0>();  // only empty groups remain; no copy may land after the CTA exits

    // O / l -> bf16 rows of `out`.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const float sum = quad_sum(l[hr]);
        const int r = wrow0 + warp * 16 + g + hr * 8;
        if (r >= n_rows) continue;
        const float inv = 1.f / sum;
        uint32_t *dst = reinterpret_cast<uint32_t *>(out + (static_cast<int64_t>(tok0 + r) * n_heads + h) * HD + 2 * q4);
#pragma unroll
        for (int n = 0; n < 16; ++n) dst[n * 4] = pack_bf16(o[n * 4 + 2 * hr] * inv, o[n * 4 + 2 * hr + 1] * inv);
    }
#endif
}

}  // namespace dbrx::cuda::wgfa
