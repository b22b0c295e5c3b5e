// Paged decode attention on the tensor cores. One CTA per (KV head, split, token): its 4 warps take
// the split's 16-key tiles in turn (tile i to warp i % 4), each streaming its tiles through its own
// cp.async pipeline of kStages shared-memory stages, so every K/V byte is read once for all G query
// heads of the KV head. Scores and P.V are mma.sync m16n8k16 bf16 products with the G query heads
// as the rows (padded to 16), an online softmax in log2 units per warp, and the warps' states are
// merged in a fixed order at the end. Tokens with one split write their output directly; longer
// contexts leave a partial state per split, and the last split CTA of a (token, KV head) to finish
// (an arrival counter that it resets) merges them in split order: no second kernel, and the merge
// of one token overlaps the other CTAs' streaming. K/V tiles are loaded with an L2 evict-first
// policy (read once) so that the partials and the block tables stay in L2. The kernel is launched
// with programmatic dependent launch: it reads the token metadata and the first block-table entries
// before waiting for the preceding kernel (which writes q and the new K/V, never the metadata).
#include <algorithm>
#include <atomic>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/mma_ptx.cuh"

namespace dbrx::cuda {
namespace {

constexpr int kWarps = 4;

// Arrival counters of the fused merge (attention_common.cuh: banks, reset by the last arrival).
__device__ uint32_t g_counters[attn::kCounterBanks * attn::kCounterBankSize];
constexpr int kTile = 16;  // keys per pipeline stage of a warp
// Pipeline depth. Measured on the H200 (B=64 x 8192 keys, B=1 x 4096 / 32768): 3 stages at 2 CTAs per
// SM and 2 stages at 3 CTAs per SM are within 0.5 % of each other; 4 stages (1 CTA per SM) lose 25 %.
constexpr int kStages = 3;

template <int HD, int Stages> struct Smem {
    static constexpr int kRow = HD + 8;  // bf16 per row: a 16-byte pad keeps ldmatrix conflict-free
    static constexpr int kTileElems = kTile * kRow;
    static constexpr int kStageElems = 2 * kTileElems;  // K tile, then V tile
    static constexpr int kWarpElems = Stages * kStageElems;
    static constexpr size_t kPipeBytes = size_t{kWarps} * kWarpElems * 2;
    // At the end of a split, each warp's m[16], l[16] and o[16][HD + 4] floats go to one of its own
    // stages, the one it has just consumed (refilled only by its next iteration).
    static constexpr int kORow = HD + 4;
    static constexpr int kStateFloats = 32 + 16 * kORow;
    static_assert(kStateFloats * 4 <= kStageElems * 2, "a warp's state must fit in one of its stages");
    static constexpr size_t kBytes = kPipeBytes;
};

// Run by the last split CTA of a token: combines the token's ns split states of the G query heads of
// KV head kvh in split order (one warp per head, each lane a float4 of the head's dimensions; split
// s's (m, l) on lane s % 32), so the output depends only on the token's own context. The first 32
// splits' accumulators are loaded with the (m, l) pairs, before the maxima are reduced.
template <int HD>
__device__ __forceinline__ void merge_splits(const float *scratch, int64_t slot, int32_t n_heads, int32_t G,
                                             int32_t kvh, int32_t splits, int32_t ns, uint16_t *out, int32_t t) {
    constexpr int kVec = HD / 4, kU = 16;  // kU divides 32: a batch never crosses a 32-split chunk
    const int64_t stride = attn::partial_stride(HD);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const bool active = lane < kVec;
    for (int32_t r = warp; r < G; r += kWarps) {
        const int32_t h = kvh * G + r;
        const float *p0 = attn::partial(const_cast<float *>(scratch), slot, n_heads, h, splits, 0, HD);
        const float *a0 = p0 + attn::kPartialHead + 4 * lane;
        // Splits 0..31 (two batches) are loaded with the (m, l) pairs, in one round trip: the merge
        // is the tail of the launch at long contexts, so its latency is the kernel's.
        float4 a[kU], b[kU];
        auto load = [&](float4(&dst)[kU], int32_t s1) {
#pragma unroll
            for (int u = 0; u < kU; ++u)
                dst[u] = active && s1 + u < ns ? __ldcg(reinterpret_cast<const float4 *>(a0 + (s1 + u) * stride))
                                               : make_float4(0.f, 0.f, 0.f, 0.f);
        };
        const float m_l = lane < ns ? __ldcg(p0 + lane * stride) : -INFINITY;
        const float l_l = lane < ns ? __ldcg(p0 + lane * stride + 1) : 0.f;
        load(a, 0);
        load(b, kU);
        float mx = m_l;
        for (int32_t s = lane + 32; s < ns; s += 32) mx = fmaxf(mx, __ldcg(p0 + s * stride));
        const float M = warp_max(mx);
        float ls = lane < ns ? l_l * exp2f(m_l - M) : 0.f;
        for (int32_t s = lane + 32; s < ns; s += 32) ls += __ldcg(p0 + s * stride + 1) * exp2f(__ldcg(p0 + s * stride) - M);
        const float L = warp_sum(ls);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        auto add = [&](const float4(&x)[kU], float f, int i) {
#pragma unroll
            for (int u = 0; u < kU; ++u) {
                const float fu = __shfl_sync(0xffffffffu, f, i + u);
                acc.x = fmaf(fu, x[u].x, acc.x);
                acc.y = fmaf(fu, x[u].y, acc.y);
                acc.z = fmaf(fu, x[u].z, acc.z);
                acc.w = fmaf(fu, x[u].w, acc.w);
            }
        };
        for (int32_t s0 = 0; s0 < ns; s0 += 32) {
            if (s0 > 0) {
                load(a, s0);
                load(b, s0 + kU);
            }
            const float f = s0 == 0 ? (lane < ns ? exp2f(m_l - M) : 0.f)
                                    : (s0 + lane < ns ? exp2f(__ldcg(p0 + (s0 + lane) * stride) - M) : 0.f);
            add(a, f, 0);
            if (s0 + kU < ns) add(b, f, kU);
        }
        if (active) {
            const uint2 v{pack_bf16(acc.x / L, acc.y / L), pack_bf16(acc.z / L, acc.w / L)};
            *reinterpret_cast<uint2 *>(out + (static_cast<int64_t>(t) * n_heads + h) * HD + 4 * lane) = v;
        }
    }
}

// Two CTAs per SM (104 KB of shared memory and about 180 registers per thread at head_dim 128). A CTA
// takes `per_cta` consecutive splits of its token (fewer, longer CTAs for large launches: one
// start-up and one pipeline fill for several splits). Every split but a token's last one is a whole
// multiple of kWarps tiles, so each split's state is computed exactly as by a CTA of its own: the
// bytes do not depend on per_cta. (Launches outside batch-invariant mode lengthen the splits
// instead, by 2^shift: one split per CTA.)
template <int HD>
__global__ void __launch_bounds__(kWarps * 32, 2)
    decode_mma_kernel(const float *q, int32_t n_heads, TokenMeta meta, KvLayer kv, int32_t splits, int32_t per_cta,
                      int32_t shift, float qscale, float *scratch, uint16_t *out, const int32_t *tok_list, int32_t slot0,
                      int32_t bank) {
    using S = Smem<HD, kStages>;
    extern __shared__ __align__(16) uint16_t smem[];
    const int32_t kvh = blockIdx.x, slot = slot0 + static_cast<int32_t>(blockIdx.z);
    const int32_t t = tok_list ? tok_list[slot] : slot;
    const int32_t ctx = meta.pos[t] + 1;
    const int32_t ns = min(attn::n_splits(ctx, shift), splits);  // the token's non-empty splits
    const int32_t s_lo = static_cast<int32_t>(blockIdx.y) * per_cta;
    if (s_lo >= ns) return;  // past this token's last split
    const int32_t s_hi = min(s_lo + per_cta, ns);
    int32_t begin, end, unused;
    attn::split_range(ctx, s_lo, splits, begin, unused, shift);
    attn::split_range(ctx, s_hi - 1, splits, unused, end, shift);
    // Tiles per warp in a whole split (split lengths are multiples of kWarps * kTile = 64 keys).
    const int32_t per_split = attn::split_len(ctx, shift) / (kWarps * kTile);
    const int32_t G = n_heads / kv.n_kv_heads, bs = kv.block_size;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const int32_t *table = meta.blocks + meta.block_off[meta.seq[t]];

    const int32_t n_tiles = (end - begin + kTile - 1) / kTile;
    const int32_t n_my = n_tiles > warp ? (n_tiles - warp + kWarps - 1) / kWarps : 0;
    uint16_t *wsm = smem + warp * S::kWarpElems;
    const uint64_t pol = evict_first_policy();  // K/V are read once
    // When a tile lies in one block (bs % kTile == 0), the block ids of this warp's tiles are read 32
    // at a time (lane i: tile win + i), a window ahead of use: no block-table read sits between two
    // tiles' copies (ncu: the loop's stalls were mostly on that dependent load). Other block sizes
    // read the table per key.
    const bool whole_tiles = bs % kTile == 0;
    auto tile_block = [&](int32_t k) {
        const int32_t j0 = begin + (warp + kWarps * k) * kTile;
        return k < n_my && j0 < end ? __ldg(table + j0 / bs) : 0;
    };
    int32_t win = 0, blk_cur = 0, blk_next = 0;
    if (whole_tiles) {
        blk_cur = tile_block(lane);
        blk_next = tile_block(32 + lane);
    }
    // Lane r < 16 finds the cache offset of key r of this warp's k-th tile (one lookup ahead of use;
    // k rises by one per call).
    auto lookup = [&](int32_t k, int64_t &off, bool &ok) {
        const int32_t j = begin + (warp + kWarps * k) * kTile + lane;
        ok = lane < kTile && k < n_my && j < end;
        int32_t blk;
        if (whole_tiles) {
            if (k >= win + 32) {
                win += 32;
                blk_cur = blk_next;
                blk_next = tile_block(win + 32 + lane);
            }
            blk = __shfl_sync(0xffffffffu, blk_cur, k - win);
        } else {
            blk = ok ? table[j / bs] : 0;
        }
        off = ok ? kv_offset(kv, blk, j % bs, kvh) : 0;
    };
    auto issue = [&](int32_t k, int64_t off, bool ok) {
        uint16_t *ks = wsm + (k % kStages) * S::kStageElems, *vs = ks + S::kTileElems;
        constexpr int kChunks = HD / 8;  // 16-byte chunks per key row
#pragma unroll
        for (int it = 0; it < kTile * kChunks / 32; ++it) {
            const int i = lane + 32 * it, r = i / kChunks, ch = i % kChunks;
            const int64_t o = __shfl_sync(0xffffffffu, off, r);
            const bool v = __shfl_sync(0xffffffffu, static_cast<int>(ok), r) != 0;
            const uint16_t *src = kv.base + o + ch * 8;
            cp_async16(smem_u32(ks + r * S::kRow + ch * 8), src, v, pol);
            cp_async16(smem_u32(vs + r * S::kRow + ch * 8), src + kv.v_offset, v, pol);
        }
    };

    float o[HD / 8][4];
    float m0, m1, l0, l1;  // rows g and g + 8; l: this lane's share
    auto reset = [&] {
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
        m0 = m1 = -INFINITY;
        l0 = l1 = 0.f;
    };
    reset();
    // Warp w's state at the end of a split: m[16], l[16], o[16][kORow] floats in its stage `stage`.
    auto state = [&](int w, int stage) {
        return reinterpret_cast<float *>(smem + w * S::kWarpElems + stage * S::kStageElems);
    };
    auto store_state = [&](int stage) {
        float *ms = state(warp, stage), *ls = ms + 16, *os = ls + 16;
        const float lq0 = quad_sum(l0), lq1 = quad_sum(l1);
        // Only the G real rows: combine() reads no other (G is 6 for DBRX: rows 8..15 are padding).
        const bool row0 = g < G, row1 = g + 8 < G;
        if (c == 0) {
            ms[g] = m0;
            ms[g + 8] = m1;
            ls[g] = lq0;
            ls[g + 8] = lq1;
        }
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            float *r0 = os + g * S::kORow + n * 8 + 2 * c, *r1 = r0 + 8 * S::kORow;
            if (row0) *reinterpret_cast<float2 *>(r0) = make_float2(o[n][0], o[n][1]);
            if (row1) *reinterpret_cast<float2 *>(r1) = make_float2(o[n][2], o[n][3]);
        }
    };
    // Merges the warps' stored states in warp order into split `sp`'s partial state (or, for a token
    // with one split, its output). The caller synchronises the CTA before and after.
    auto combine = [&](int stage, int32_t sp) {
        for (int32_t idx = threadIdx.x; idx < G * HD; idx += kWarps * 32) {
            const int32_t r = idx / HD, dim = idx % HD;
            float M = state(0, stage)[r];
#pragma unroll
            for (int w = 1; w < kWarps; ++w) M = fmaxf(M, state(w, stage)[r]);
            float L = 0.f, A = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float *ws = state(w, stage);
                const float f = exp2f(ws[r] - M);  // 0 for a warp without tiles (m = -inf)
                L += ws[16 + r] * f;
                A += ws[32 + r * S::kORow + dim] * f;
            }
            const int32_t h = kvh * G + r;
            if (ns == 1) {
                out[(static_cast<int64_t>(t) * n_heads + h) * HD + dim] = f2bf(A / L);
            } else {
                float *p = attn::partial(scratch, slot, n_heads, h, splits, sp, HD);
                if (dim == 0) {
                    p[0] = M;
                    p[1] = L;
                }
                p[attn::kPartialHead + dim] = A;
            }
        }
    };

    // The first kStages tiles' block-table entries, all in flight at once.
    int64_t offs[kStages];
    bool oks[kStages];
#pragma unroll
    for (int s = 0; s < kStages; ++s) lookup(s, offs[s], oks[s]);
    // Everything above read only the token metadata; q and the cache (the new token's K/V) come from
    // the preceding kernel.
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_my) issue(s, offs[s], oks[s]);
        cp_commit();
    }
    int64_t off = offs[kStages - 1];
    bool ok = oks[kStages - 1];
    // Q as the A operand: rows are the group's query heads (zero past G), scaled into log2 units;
    // loaded once the first tiles are in flight.
    uint32_t qf[HD / 16][4];
    {
        const float *qh = q + (static_cast<int64_t>(t) * n_heads + static_cast<int64_t>(kvh) * G) * HD;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = g + (i & 1) * 8, col = ks * 16 + 2 * c + (i >> 1) * 8;
                float2 v = make_float2(0.f, 0.f);
                if (row < G) v = *reinterpret_cast<const float2 *>(qh + row * HD + col);
                qf[ks][i] = pack_bf16(v.x * qscale, v.y * qscale);
            }
    }

    for (int32_t k = 0; k < n_my; ++k) {
        const int32_t kn = k + kStages - 1;
        if (kn < n_my) {
            issue(kn, off, ok);
            lookup(kn + 1, off, ok);
        }
        cp_commit();
        cp_wait<kStages - 1>();
        __syncwarp();
        const uint16_t *ks = wsm + (k % kStages) * S::kStageElems, *vs = ks + S::kTileElems;

        // Scores of the 16 keys: sc[n] holds keys n*8 + 2c, +1 (rows g: [0..1], g + 8: [2..3]).
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            uint32_t b[4];
            ldsm_x4(smem_u32(ks + ((lane / 16) * 8 + lane % 8) * S::kRow + kk * 16 + ((lane / 8) % 2) * 8), b);
            mma_bf16(sc[0], qf[kk], b[0], b[1]);
            mma_bf16(sc[1], qf[kk], b[2], b[3]);
        }
        const int32_t j0 = begin + (warp + kWarps * k) * kTile;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (j0 + n * 8 + 2 * c + e >= end) sc[n][e] = sc[n][2 + e] = -INFINITY;

        // Online softmax; key j0 is always valid, so the new maxima are finite.
        const float mn0 = fmaxf(m0, quad_max(fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1]))));
        const float mn1 = fmaxf(m1, quad_max(fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3]))));
        const float c0 = exp2f(m0 - mn0), c1 = exp2f(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        uint32_t pa[4];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            pa[2 * n] = pack_bf16(exp2f(sc[n][0] - mn0), exp2f(sc[n][1] - mn0));
            pa[2 * n + 1] = pack_bf16(exp2f(sc[n][2] - mn1), exp2f(sc[n][3] - mn1));
        }
        // Sum the bf16-rounded probabilities that P.V uses, so the normalisation matches them.
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            s0 += bf16_lo(pa[2 * n]) + bf16_hi(pa[2 * n]);
            s1 += bf16_lo(pa[2 * n + 1]) + bf16_hi(pa[2 * n + 1]);
        }
        l0 = l0 * c0 + s0;
        l1 = l1 * c1 + s1;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            o[n][0] *= c0;
            o[n][1] *= c0;
            o[n][2] *= c1;
            o[n][3] *= c1;
        }
        // O += P V, V through transposing ldmatrix (keys are the k dimension).
#pragma unroll
        for (int d = 0; d < HD / 16; ++d) {
            uint32_t b[4];
            ldsm_x4_trans(smem_u32(vs + (((lane / 8) % 2) * 8 + lane % 8) * S::kRow + d * 16 + (lane / 16) * 8), b);
            mma_bf16(o[2 * d], pa, b[0], b[1]);
            mma_bf16(o[2 * d + 1], pa, b[2], b[3]);
        }
        // A whole split of the range ends with this tile (at the same k in every warp): its state
        // goes to the stage just consumed, which the next iteration refills only after the merge.
        if ((k + 1) % per_split == 0 && k + 1 < (s_hi - s_lo) * per_split) {
            const int stage = k % kStages;
            __syncwarp();  // every lane's ldmatrix reads of the stage are done
            store_state(stage);
            __syncthreads();
            combine(stage, s_lo + (k + 1) / per_split - 1);
            __syncthreads();
            reset();
        }
        __syncwarp();  // this stage is refilled by the next iteration's issue
    }
    cp_wait<0>();
    // A kernel launched after this one with programmatic dependent launch may start its blocks once
    // every CTA got here (the last wave); it still waits for this grid to complete before its reads.
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    // The range's last split: every stage is free now.
    store_state(0);
    __syncthreads();
    combine(0, s_hi - 1);
    if (ns == 1) return;
    // Publish the range's split states, then count them in; the last arrival merges and resets the
    // counter (every other split of the token has counted itself in by then).
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) {
        uint32_t *ctr = g_counters + static_cast<int64_t>(bank) * attn::kCounterBankSize +
                        static_cast<int64_t>(blockIdx.z) * kv.n_kv_heads + kvh;
        last = atomicAdd(ctr, static_cast<uint32_t>(s_hi - s_lo)) == static_cast<uint32_t>(ns - (s_hi - s_lo));
        if (last) atomicExch(ctr, 0u);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();  // the other splits' partials, published before their arrivals, are visible
    merge_splits<HD>(scratch, slot, n_heads, G, kvh, splits, ns, out, t);
}

// Waves of CTAs below which a launch gets no more splits per CTA (the last wave's idle SMs and each
// CTA's start-up weigh less than with fewer, longer CTAs).
constexpr int kMinWaves = 4;

int32_t sm_count(int dev) {
    static std::atomic<int32_t> counts[64] = {};
    std::atomic<int32_t> &n = counts[dev & 63];
    int32_t v = n.load(std::memory_order_relaxed);
    if (v == 0) {
        int sms = 0;
        DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        v = std::max(1, sms);
        n.store(v, std::memory_order_relaxed);
    }
    return v;
}

template <int HD> void launch(const attn::Launch &a, int32_t n_tokens, cudaStream_t stream) {
    constexpr size_t kBytes = Smem<HD, kStages>::kBytes;
    // The dynamic shared-memory limit is a per-device attribute of the function: raise it once per device.
    static std::atomic<uint64_t> raised{0};
    int dev = 0;
    DBRX_CUDA_CHECK(cudaGetDevice(&dev));
    const uint64_t bit = uint64_t{1} << (dev & 63);
    if (!(raised.load(std::memory_order_acquire) & bit)) {
        DBRX_CUDA_CHECK(cudaFuncSetAttribute(decode_mma_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(kBytes)));
        raised.fetch_or(bit, std::memory_order_acq_rel);
    }
    const float qscale = attn::kLog2e / sqrtf(static_cast<float>(HD));
    const int32_t bank = attn::counter_bank(stream);
    // Grid z is limited to 65535 and a counter bank to kCounterBankSize (token, KV head) pairs:
    // larger launches go in slices of tokens (the same kernel, so a token's bytes still do not depend
    // on the launch size; the slices run in stream order and reuse the bank's counters).
    const int32_t max_z = std::max(1, std::min(65535, attn::kCounterBankSize / a.kv.n_kv_heads));
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg{};
    cfg.blockDim = dim3(kWarps * 32);
    cfg.dynamicSmemBytes = kBytes;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    for (int32_t slot0 = 0; slot0 < n_tokens; slot0 += max_z) {
        const int32_t n_z = std::min(max_z, n_tokens - slot0);
        // Several splits per CTA while the grid keeps at least kMinWaves waves of 2 CTAs per SM.
        int32_t per_cta = 1;
        auto ctas = [&](int32_t f) { return int64_t{a.kv.n_kv_heads} * ((a.splits + f - 1) / f) * n_z; };
        while (2 * per_cta <= a.splits && ctas(2 * per_cta) >= int64_t{kMinWaves} * 2 * sm_count(dev))
            per_cta *= 2;
        // Outside batch-invariant mode a CTA's per_cta splits become one split per_cta times longer: one
        // partial state instead of per_cta, and no merge at each split's end inside the CTA.
        int32_t grid_splits = a.splits, shift = 0;
        if (!a.batch_invariant) {
            while ((1 << shift) < per_cta) ++shift;
            grid_splits = (a.splits + per_cta - 1) / per_cta;
            per_cta = 1;
        }
        cfg.gridDim = dim3(a.kv.n_kv_heads, (grid_splits + per_cta - 1) / per_cta, n_z);
        DBRX_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_mma_kernel<HD>, a.q, a.n_heads, a.meta, a.kv, grid_splits,
                                           per_cta, shift, qscale, a.scratch, a.out, a.tok_list, slot0, bank));
    }
}

}  // namespace

namespace attn {

bool launch_mma(const Launch &a, int32_t n_tokens, cudaStream_t stream) {
    const KvLayer &kv = a.kv;
    const int32_t G = a.n_heads / kv.n_kv_heads;
    // 16-byte cp.async needs every key row 16-byte aligned; grid y (the splits) is limited to 65535.
    const bool aligned = reinterpret_cast<uintptr_t>(kv.base) % 16 == 0 && kv.block_stride % 8 == 0 &&
                         kv.v_offset % 8 == 0 && kv.head_stride % 8 == 0 && kv.row_stride % 8 == 0;
    if (G < 1 || G > 16 || !aligned || a.splits > 65535) return false;
    switch (kv.head_dim) {
    case 16: launch<16>(a, n_tokens, stream); return true;
    case 32: launch<32>(a, n_tokens, stream); return true;
    case 64: launch<64>(a, n_tokens, stream); return true;
    case 128: launch<128>(a, n_tokens, stream); return true;
    default: return false;
    }
}

}  // namespace attn
}  // namespace dbrx::cuda
