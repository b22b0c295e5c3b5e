// Paged decode attention on the tensor cores. One CTA per (KV head, split, token): its 4 warps take
// the split's 16-key tiles in turn (tile i to warp i % 4), each streaming its tiles through its own
// cp.async pipeline of kStages shared-memory stages, so every K/V byte is read once for all G query
// heads of the KV head. Scores and P.V are mma.sync m16n8k16 bf16 products with the G query heads
// as the rows (padded to 16), an online softmax in log2 units per warp, and the warps' states are
// merged in a fixed order at the end. Tokens with one split write their output directly; longer
// contexts leave a partial state per split for the merge kernel (attention.cu).
#include <algorithm>
#include <atomic>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"

namespace dbrx::cuda {
namespace {

constexpr int kWarps = 4;
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
    // After the main loop the same memory holds each warp's m[16], l[16] and o[16][HD + 8] floats.
    static constexpr int kORow = HD + 8;
    static constexpr size_t kMergeBytes = size_t{kWarps} * (32 + 16 * kORow) * 4;
    static constexpr size_t kBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
};

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (nothing is read then).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// d += a (16x16, row) * b (16x8, col), bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Two CTAs per SM (104 KB of shared memory and 178 registers per thread at head_dim 128).
template <int HD>
__global__ void __launch_bounds__(kWarps * 32, 2)
    decode_mma_kernel(const float *q, int32_t n_heads, TokenMeta meta, KvLayer kv, int32_t splits, float qscale,
                      float *scratch, uint16_t *out, const int32_t *tok_list, int32_t slot0) {
    using S = Smem<HD, kStages>;
    extern __shared__ __align__(16) uint16_t smem[];
    const int32_t kvh = blockIdx.x, split = blockIdx.y, slot = slot0 + static_cast<int32_t>(blockIdx.z);
    const int32_t t = tok_list ? tok_list[slot] : slot;
    const int32_t ctx = meta.pos[t] + 1;
    int32_t begin, end;
    attn::split_range(ctx, split, splits, begin, end);
    if (begin >= end) return;  // past this token's last split
    const int32_t G = n_heads / kv.n_kv_heads, bs = kv.block_size;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const int32_t *table = meta.blocks + meta.block_off[meta.seq[t]];

    const int32_t n_tiles = (end - begin + kTile - 1) / kTile;
    const int32_t n_my = n_tiles > warp ? (n_tiles - warp + kWarps - 1) / kWarps : 0;
    uint16_t *wsm = smem + warp * S::kWarpElems;
    // Lane r < 16 finds the cache offset of key r of this warp's k-th tile (one lookup ahead of use).
    auto lookup = [&](int32_t k, int64_t &off, bool &ok) {
        const int32_t j = begin + (warp + kWarps * k) * kTile + lane;
        ok = lane < kTile && k < n_my && j < end;
        off = ok ? static_cast<int64_t>(table[j / bs]) * kv.block_stride +
                       (static_cast<int64_t>(j % bs) * kv.n_kv_heads + kvh) * HD
                 : 0;
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
            cp_async16(smem_u32(ks + r * S::kRow + ch * 8), src, v);
            cp_async16(smem_u32(vs + r * S::kRow + ch * 8), src + kv.v_offset, v);
        }
    };

    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8; l: this lane's share

    int64_t off;
    bool ok;
    lookup(0, off, ok);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_my) {
            issue(s, off, ok);
            lookup(s + 1, off, ok);
        }
        cp_commit();
    }
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
        __syncwarp();  // this stage is refilled by the next iteration's issue
    }
    cp_wait<0>();
    // The merge kernel (launched with programmatic dependent launch) may start its blocks once every
    // CTA got here; it still waits for this grid to complete before reading the partials.
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);

    // Merge the warps' states in warp order through shared memory (reusing the pipeline's).
    __syncthreads();
    float *ms = reinterpret_cast<float *>(smem), *ls = ms + kWarps * 16, *os = ls + kWarps * 16;
    if (c == 0) {
        ms[warp * 16 + g] = m0;
        ms[warp * 16 + g + 8] = m1;
        ls[warp * 16 + g] = l0;
        ls[warp * 16 + g + 8] = l1;
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        float *r0 = os + (warp * 16 + g) * S::kORow + n * 8 + 2 * c, *r1 = r0 + 8 * S::kORow;
        *reinterpret_cast<float2 *>(r0) = make_float2(o[n][0], o[n][1]);
        *reinterpret_cast<float2 *>(r1) = make_float2(o[n][2], o[n][3]);
    }
    __syncthreads();
    const bool single = attn::n_splits(ctx) == 1 || splits == 1;
    for (int32_t idx = threadIdx.x; idx < G * HD; idx += kWarps * 32) {
        const int32_t r = idx / HD, dim = idx % HD;
        float M = ms[r];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) M = fmaxf(M, ms[w * 16 + r]);
        float L = 0.f, A = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float f = exp2f(ms[w * 16 + r] - M);  // 0 for a warp without tiles (m = -inf)
            L += ls[w * 16 + r] * f;
            A += os[(w * 16 + r) * S::kORow + dim] * f;
        }
        const int32_t h = kvh * G + r;
        if (single) {
            out[(static_cast<int64_t>(t) * n_heads + h) * HD + dim] = f2bf(A / L);
        } else {
            float *p = attn::partial(scratch, slot, n_heads, h, splits, split, HD);
            if (dim == 0) {
                p[0] = M;
                p[1] = L;
            }
            p[2 + dim] = A;
        }
    }
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
    // Grid z is limited to 65535: larger launches go in slices of tokens (the same kernel, so a
    // token's bytes still do not depend on the launch size).
    constexpr int32_t kMaxZ = 65535;
    for (int32_t slot0 = 0; slot0 < n_tokens; slot0 += kMaxZ) {
        const dim3 grid(a.kv.n_kv_heads, a.splits, std::min(kMaxZ, n_tokens - slot0));
        decode_mma_kernel<HD><<<grid, kWarps * 32, kBytes, stream>>>(a.q, a.n_heads, a.meta, a.kv, a.splits, qscale,
                                                                      a.scratch, a.out, a.tok_list, slot0);
        DBRX_CUDA_LAUNCH_CHECK();
    }
}

}  // namespace

namespace attn {

bool launch_mma(const Launch &a, int32_t n_tokens, cudaStream_t stream) {
    const KvLayer &kv = a.kv;
    const int32_t G = a.n_heads / kv.n_kv_heads;
    // 16-byte cp.async needs every key row 16-byte aligned; grid y (the splits) is limited to 65535.
    const bool aligned = reinterpret_cast<uintptr_t>(kv.base) % 16 == 0 && kv.block_stride % 8 == 0 &&
                         kv.v_offset % 8 == 0;
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
