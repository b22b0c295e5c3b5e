// Generic decode attention on the CUDA cores (fp32), for the shapes the tensor-core path does not
// take: one thread block per (token, KV head, split) walks the split's keys once through the block
// table and scores every query head of the group against each key with an online softmax, then
// writes the split's partial state (attention_common.cuh) for the merge kernel.
#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"

namespace dbrx::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;    // query heads per KV head

template <int kPerLane>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const float *q, int32_t n_heads, TokenMeta meta, KvLayer kv, int32_t splits, float scale,
                     float *scratch, const int32_t *tok_list) {
    const int32_t slot = blockIdx.x, t = tok_list ? tok_list[slot] : slot, kvh = blockIdx.y, split = blockIdx.z;
    const int32_t hd = kv.head_dim, G = n_heads / kv.n_kv_heads, bs = kv.block_size;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int32_t ctx = meta.pos[t] + 1;
    int32_t begin, end;
    attn::split_range(ctx, split, splits, begin, end);
    if (begin >= end) return;  // past this token's last split
    const int32_t *table = meta.blocks + meta.block_off[meta.seq[t]];

    float qr[kMaxGroup][kPerLane], acc[kMaxGroup][kPerLane], m[kMaxGroup], l[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int dim = lane + 32 * i;
            acc[g][i] = 0.f;
            qr[g][i] = (g < G && dim < hd) ? q[(static_cast<int64_t>(t) * n_heads + kvh * G + g) * hd + dim] * scale : 0.f;
        }
    }
    for (int32_t j = begin + warp; j < end; j += kWarps) {
        const int64_t off = kv_offset(kv, table[j / bs], j % bs, kvh);
        const uint16_t *kp = kv.base + off, *vp = kv.base + off + kv.v_offset;
        float kr[kPerLane], vr[kPerLane];
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int dim = lane + 32 * i;
            kr[i] = dim < hd ? bf16f(kp[dim]) : 0.f;
            vr[i] = dim < hd ? bf16f(vp[dim]) : 0.f;
        }
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= G) break;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) s += qr[g][i] * kr[i];
            s = warp_sum(s);
            const float m_new = fmaxf(m[g], s);
            const float corr = expf(m[g] - m_new), p = expf(s - m_new);
            l[g] = l[g] * corr + p;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) acc[g][i] = acc[g][i] * corr + p * vr[i];
            m[g] = m_new;
        }
    }
    // Merge the warps' states through shared memory, then write this split's partial state.
    __shared__ float sm[kWarps][kMaxGroup][2];
    __shared__ float sacc[kWarps][kMaxGroup][kPerLane * 32];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;
        if (lane == 0) {
            sm[warp][g][0] = m[g];
            sm[warp][g][1] = l[g];
        }
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (lane + 32 * i < hd) sacc[warp][g][lane + 32 * i] = acc[g][i];
    }
    __syncthreads();
    for (int32_t idx = threadIdx.x; idx < G * hd; idx += blockDim.x) {
        const int g = idx / hd, dim = idx % hd;
        float M = -INFINITY;
        for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm[w][g][0]);
        float L = 0.f, A = 0.f;
        if (M != -INFINITY)
            for (int w = 0; w < kWarps; ++w) {
                const float f = expf(sm[w][g][0] - M);
                L += sm[w][g][1] * f;
                A += sacc[w][g][dim] * f;
            }
        float *out = attn::partial(scratch, slot, n_heads, kvh * G + g, splits, split, hd);
        if (dim == 0) {
            out[0] = M * attn::kLog2e;
            out[1] = L;
        }
        out[attn::kPartialHead + dim] = A;
    }
}

// head_dim <= 128: one key per thread for the scores (no per-key warp reductions), then P V with
// each warp taking a quarter of the chunk's keys and each lane 4 output dimensions, in chunks of
// kChunk keys with an online softmax across chunks. K and V are read once per block for all G
// query heads of the KV head.
constexpr int kChunk = 128;
constexpr int kKeyWarps = kChunk / 32;

__global__ void __launch_bounds__(kChunk)
    attention_keys_kernel(const float *q, int32_t n_heads, TokenMeta meta, KvLayer kv, int32_t splits, float scale,
                          float *scratch, const int32_t *tok_list) {
    const int32_t slot = blockIdx.x, t = tok_list ? tok_list[slot] : slot, kvh = blockIdx.y, split = blockIdx.z;
    const int32_t hd = kv.head_dim, G = n_heads / kv.n_kv_heads, bs = kv.block_size, tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int32_t ctx = meta.pos[t] + 1;
    int32_t begin, end;
    attn::split_range(ctx, split, splits, begin, end);
    if (begin >= end) return;  // past this token's last split
    const int32_t *table = meta.blocks + meta.block_off[meta.seq[t]];
    __shared__ float qs[kMaxGroup][128];
    __shared__ float ps[kMaxGroup][kChunk];
    __shared__ float red_max[kMaxGroup][kKeyWarps], red_sum[kMaxGroup][kKeyWarps];
    __shared__ int64_t offs[kChunk];
    __shared__ float accs[kKeyWarps][kMaxGroup][128];
    for (int32_t i = tid; i < G * hd; i += kChunk)
        qs[i / hd][i % hd] = q[(static_cast<int64_t>(t) * n_heads + kvh * G) * hd + i] * scale;
    const bool has_dims = lane * 4 < hd;
    float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][4];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[g][i] = 0.f;
    }
    __syncthreads();
    for (int32_t c0 = begin; c0 < end; c0 += kChunk) {
        const int32_t j = c0 + tid, n = min(kChunk, end - c0);
        float sc[kMaxGroup];
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) sc[g] = -INFINITY;
        if (tid < n) {
            const int64_t off = kv_offset(kv, table[j / bs], j % bs, kvh);
            offs[tid] = off;
            const uint4 *kp = reinterpret_cast<const uint4 *>(kv.base + off);
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g) sc[g] = 0.f;
#pragma unroll 4
            for (int32_t v8 = 0; v8 < hd / 8; ++v8) {
                float kf[8];
                unpack8(kp[v8], kf);
#pragma unroll
                for (int g = 0; g < kMaxGroup; ++g) {
                    if (g >= G) break;
#pragma unroll
                    for (int i = 0; i < 8; ++i) sc[g] += qs[g][v8 * 8 + i] * kf[i];
                }
            }
        }
        // Chunk maximum per head (block reduction), then probabilities and their sums.
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= G) break;
            const float w = warp_max(sc[g]);
            if (lane == 0) red_max[g][warp] = w;
        }
        __syncthreads();
        float corr[kMaxGroup];
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= G) break;
            float mx = red_max[g][0];
#pragma unroll
            for (int w = 1; w < kKeyWarps; ++w) mx = fmaxf(mx, red_max[g][w]);
            const float m_new = fmaxf(m[g], mx);
            corr[g] = expf(m[g] - m_new);
            const float p = tid < n ? expf(sc[g] - m_new) : 0.f;
            ps[g][tid] = p;
            const float w = warp_sum(p);
            if (lane == 0) red_sum[g][warp] = w;
            m[g] = m_new;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= G) break;
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < kKeyWarps; ++w) sum += red_sum[g][w];
            l[g] = l[g] * corr[g] + sum;
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[g][i] *= corr[g];
        }
        // P V: this warp's keys, 4 dimensions per lane.
        if (has_dims) {
            const int32_t i0 = warp * 32, i1 = min(n, i0 + 32);
#pragma unroll 8
            for (int32_t i = i0; i < i1; ++i) {
                const uint2 raw = *reinterpret_cast<const uint2 *>(kv.base + offs[i] + kv.v_offset + lane * 4);
                const float v0 = bf16_lo(raw.x), v1 = bf16_hi(raw.x), v2 = bf16_lo(raw.y), v3 = bf16_hi(raw.y);
#pragma unroll
                for (int g = 0; g < kMaxGroup; ++g) {
                    if (g >= G) break;
                    const float p = ps[g][i];
                    acc[g][0] += p * v0;
                    acc[g][1] += p * v1;
                    acc[g][2] += p * v2;
                    acc[g][3] += p * v3;
                }
            }
        }
        __syncthreads();  // ps, red_* and offs are rewritten by the next chunk
    }
    // Sum the warps' P V partials (same running max in every warp), write this split's state.
    if (has_dims)
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= G) break;
#pragma unroll
            for (int i = 0; i < 4; ++i) accs[warp][g][lane * 4 + i] = acc[g][i];
        }
    __syncthreads();
    for (int32_t idx = tid; idx < G * hd; idx += kChunk) {
        const int32_t g = idx / hd, dim = idx % hd;
        float a = 0.f;
        for (int w = 0; w < kKeyWarps; ++w) a += accs[w][g][dim];
        float *out = attn::partial(scratch, slot, n_heads, kvh * G + g, splits, split, hd);
        out[attn::kPartialHead + dim] = a;
    }
    if (tid == 0)
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= G) break;
            float *out = attn::partial(scratch, slot, n_heads, kvh * G + g, splits, split, hd);
            out[0] = m[g] * attn::kLog2e;
            out[1] = l[g];
        }
}

}  // namespace

namespace attn {

void launch_generic(const Launch &a, int32_t n_tokens, cudaStream_t stream) {
    const KvLayer &kv = a.kv;
    const float scale = 1.0f / sqrtf(static_cast<float>(kv.head_dim));
    const dim3 grid(n_tokens, kv.n_kv_heads, a.splits);
    if (kv.head_dim <= 128 && kv.head_dim % 8 == 0)
        attention_keys_kernel<<<grid, kChunk, 0, stream>>>(a.q, a.n_heads, a.meta, kv, a.splits, scale, a.scratch,
                                                           a.tok_list);
    else if (kv.head_dim <= 32)
        attention_kernel<1><<<grid, kWarps * 32, 0, stream>>>(a.q, a.n_heads, a.meta, kv, a.splits, scale, a.scratch,
                                                              a.tok_list);
    else if (kv.head_dim <= 128)
        attention_kernel<4><<<grid, kWarps * 32, 0, stream>>>(a.q, a.n_heads, a.meta, kv, a.splits, scale, a.scratch,
                                                              a.tok_list);
    else
        attention_kernel<8><<<grid, kWarps * 32, 0, stream>>>(a.q, a.n_heads, a.meta, kv, a.splits, scale, a.scratch,
                                                              a.tok_list);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace attn
}  // namespace dbrx::cuda
