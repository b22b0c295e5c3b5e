// Element-wise and per-token kernels: embedding, LayerNorm, the Wqkv epilogue (clamp + RoPE + KV
// write), router top-k, MoE permutation / un-permutation, SiLU*up and a random fill.
#include <algorithm>
#include <string>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace {

__global__ void embed_kernel(const int32_t *ids, const uint16_t *wte, float *h, int32_t d) {
    const uint16_t *row = wte + static_cast<int64_t>(ids[blockIdx.x]) * d;
    float *out = h + static_cast<int64_t>(blockIdx.x) * d;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) out[i] = bf16f(row[i]);
}

// Block-wide sum over 256 threads.
__device__ float block_sum(float v, float *shared) {
    v = warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += shared[w];
    return total;
}

__global__ void layernorm_kernel(const float *x, const int32_t *rows, const uint16_t *w, uint16_t *y, int32_t d) {
    __shared__ float shared[32];
    const int64_t src = rows ? rows[blockIdx.x] : blockIdx.x;
    const float *xr = x + src * d;
    float s = 0.f;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, shared) / d;
    float v = 0.f;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = xr[i] - mean;
        v += c * c;
    }
    const float rstd = rsqrtf(block_sum(v, shared) / d + 1e-5f);
    uint16_t *yr = y + static_cast<int64_t>(blockIdx.x) * d;
    for (int32_t i = threadIdx.x; i < d; i += blockDim.x) yr[i] = f2bf((xr[i] - mean) * rstd * bf16f(w[i]));
}

__device__ __forceinline__ float clampf(float v, float clip) { return clip > 0.f ? fminf(fmaxf(v, -clip), clip) : v; }

__global__ void qkv_epilogue_kernel(const float *qkv, int32_t n_heads, float clip, const float *inv_freq,
                                    TokenMeta meta, KvLayer kv, float *q_out) {
    const int32_t t = blockIdx.x, hd = kv.head_dim, half = hd / 2, KV = kv.n_kv_heads;
    const int32_t d = n_heads * hd, rows = d + 2 * KV * hd;
    const float *src = qkv + static_cast<int64_t>(t) * rows;
    const int32_t pos = meta.pos[t];
    const int32_t blk = meta.blocks[meta.block_off[meta.seq[t]] + pos / kv.block_size];
    const int32_t slot = pos % kv.block_size;
    uint16_t *const vbase = kv.base + kv.v_offset;
    // Rotated pairs of q and k heads: (head, i) for i < hd/2.
    const int32_t n_pairs = (n_heads + KV) * half;
    for (int32_t p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const int32_t head = p / half, i = p % half;
        const float angle = static_cast<float>(pos) * inv_freq[i];
        const float c = cosf(angle), s = sinf(angle);
        const float x1 = clampf(src[head * hd + i], clip), x2 = clampf(src[head * hd + i + half], clip);
        const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        if (head < n_heads) {
            float *q = q_out + (static_cast<int64_t>(t) * n_heads + head) * hd;
            q[i] = y1;
            q[i + half] = y2;
        } else {
            uint16_t *k = kv.base + kv_offset(kv, blk, slot, head - n_heads);
            k[i] = f2bf(y1);
            k[i + half] = f2bf(y2);
        }
    }
    for (int32_t i = threadIdx.x; i < KV * hd; i += blockDim.x)
        vbase[kv_offset(kv, blk, slot, i / hd) + i % hd] = f2bf(clampf(src[d + KV * hd + i], clip));
}

constexpr int kMaxExperts = 64;

// One warp per token: lane e holds the logits of experts e and e + 32.
__global__ void route_kernel(const float *logits, int32_t n_tokens, int32_t E, int32_t k, float norm_p,
                             int32_t *experts, float *weights) {
    const int32_t t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= n_tokens) return;
    const float *l = logits + static_cast<int64_t>(t) * E;
    const int32_t e0 = lane, e1 = lane + 32;
    const float v0 = e0 < E ? l[e0] : -INFINITY, v1 = e1 < E ? l[e1] : -INFINITY;
    const float m = warp_max(fmaxf(v0, v1));
    float p0 = e0 < E ? expf(v0 - m) : 0.f, p1 = e1 < E ? expf(v1 - m) : 0.f;
    const float sum = warp_sum(p0 + p1);
    p0 /= sum;
    p1 /= sum;
    if (e0 >= E) p0 = -1.f;  // never chosen
    if (e1 >= E) p1 = -1.f;
    float norm = 0.f;
    for (int32_t r = 0; r < k; ++r) {
        // Warp argmax, ties to the lower expert index.
        float v = p0 >= p1 ? p0 : p1;
        int32_t i = p0 >= p1 ? e0 : e1;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const int32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
            if (ov > v || (ov == v && oi < i)) {
                v = ov;
                i = oi;
            }
        }
        if (i == e0) p0 = -1.f;
        if (i == e1) p1 = -1.f;
        if (lane == 0) {
            experts[t * k + r] = i;
            weights[t * k + r] = v;
        }
        norm += norm_p == 1.f ? fabsf(v) : powf(fabsf(v), norm_p);
    }
    if (norm_p > 0.f && lane == 0) {
        norm = norm_p == 1.f ? norm : powf(norm, 1.f / norm_p);
        for (int32_t r = 0; r < k; ++r) weights[t * k + r] /= norm;
    }
}

__global__ void permute_kernel(const int32_t *experts, int32_t n_pairs, int32_t E, int32_t *offsets, int32_t *active,
                               int32_t *perm_row, int32_t *row_token, int32_t k) {
    __shared__ int32_t count[kMaxExperts], cursor[kMaxExperts];
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n_pairs; i += blockDim.x) atomicAdd(&count[experts[i]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int32_t off = 0, n_active = 0;
        for (int e = 0; e < E; ++e) {
            offsets[e] = off;
            cursor[e] = off;
            if (count[e] > 0) active[1 + n_active++] = e;
            off += count[e];
        }
        offsets[E] = off;
        active[0] = n_active;
    }
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n_pairs; i += blockDim.x) {
        const int32_t row = atomicAdd(&cursor[experts[i]], 1);
        perm_row[i] = row;
        row_token[row] = i / k;
    }
}

__global__ void gather_rows_kernel(const uint4 *x, const int32_t *row_token, uint4 *xp, int32_t vecs) {
    const uint4 *src = x + static_cast<int64_t>(row_token[blockIdx.x]) * vecs;
    uint4 *dst = xp + static_cast<int64_t>(blockIdx.x) * vecs;
    for (int32_t i = threadIdx.x; i < vecs; i += blockDim.x) dst[i] = src[i];
}

__global__ void silu_mul_kernel(const float *gu, uint16_t *g, int32_t n_rows, int32_t F) {
    const int64_t n = static_cast<int64_t>(n_rows) * F;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t row = i / F, j = i % F;
        const float *r = gu + row * 2 * F;
        g[i] = f2bf(silu(r[j]) * r[F + j]);
    }
}

__global__ void unpermute_kernel(const float *y, int32_t n_parts, int64_t part_stride, const int32_t *perm_row,
                                 const float *weights, int32_t k, int32_t d, float *h) {
    const int32_t t = blockIdx.x;
    float *out = h + static_cast<int64_t>(t) * d;
    // grid.y splits the columns: at decode sizes one block per token would read all partials alone.
    for (int32_t c = blockIdx.y * blockDim.x + threadIdx.x; c < d; c += gridDim.y * blockDim.x) {
        float acc = 0.f;
        for (int32_t r = 0; r < k; ++r) {
            const int64_t row = perm_row[t * k + r];
            float s = 0.f;
#pragma unroll 8
            for (int32_t p = 0; p < n_parts; ++p) s += y[p * part_stride + row * d + c];
            acc += weights[t * k + r] * s;
        }
        out[c] += acc;
    }
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

__global__ void fill_uniform_kernel(uint16_t *p, int64_t n, uint64_t seed, float mean, float half_range) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const uint64_t r = splitmix64(seed * 0x100000001b3ull + static_cast<uint64_t>(i));
        const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        p[i] = f2bf(mean + (2.f * u - 1.f) * half_range);
    }
}

__global__ void read_probe_kernel(const uint4 *p, int64_t n_vec, float *out) {
    float acc = 0.f;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_vec;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const uint4 v = load_stream(p + i);
        acc += bf16_lo(v.x) + bf16_hi(v.y) + bf16_lo(v.z) + bf16_hi(v.w);
    }
    acc = warp_sum(acc);
    if (threadIdx.x % 32 == 0) atomicAdd(out + blockIdx.x, acc);
}

int grid_for(int64_t n, int threads) {
    const int64_t blocks = (n + threads - 1) / threads;
    return static_cast<int>(blocks < 132 * 32 ? (blocks < 1 ? 1 : blocks) : 132 * 32);
}

}  // namespace

void check_kv_layer(const KvLayer &kv, const char *where) {
    // Span of one half (K or V) of a block: from its first row's start to its last row's end.
    const int64_t span = int64_t{kv.block_size - 1} * kv.row_stride + int64_t{kv.n_kv_heads - 1} * kv.head_stride +
                         kv.head_dim;
    if (kv.block_size < 1 || kv.n_kv_heads < 1 || kv.head_dim < 1 || kv.row_stride < 1 || kv.head_stride < 1 ||
        span > kv.v_offset || kv.v_offset + span > kv.block_stride)
        invalid_argument(std::string(where) + ": KV layer of block_size " + std::to_string(kv.block_size) + ", " +
                         std::to_string(kv.n_kv_heads) + " KV heads of " + std::to_string(kv.head_dim) +
                         ", row_stride " + std::to_string(kv.row_stride) + ", head_stride " +
                         std::to_string(kv.head_stride) + ", v_offset " + std::to_string(kv.v_offset) +
                         ", block_stride " + std::to_string(kv.block_stride) +
                         " does not fit its blocks (build it with kv_layer())");
}

void embed(const int32_t *ids, const bf16_t *wte, float *h, int32_t n_tokens, int32_t d, cudaStream_t stream) {
    if (n_tokens == 0) return;
    embed_kernel<<<n_tokens, 256, 0, stream>>>(ids, wte, h, d);
    DBRX_CUDA_LAUNCH_CHECK();
}

void layernorm(const float *x, const int32_t *rows, const bf16_t *w, bf16_t *y, int32_t n_rows, int32_t d,
               cudaStream_t stream) {
    if (n_rows == 0) return;
    layernorm_kernel<<<n_rows, 256, 0, stream>>>(x, rows, w, y, d);
    DBRX_CUDA_LAUNCH_CHECK();
}

void qkv_epilogue(const float *qkv, int32_t n_tokens, int32_t n_heads, float clip, const float *inv_freq,
                  TokenMeta meta, KvLayer kv, float *q_out, cudaStream_t stream) {
    check_kv_layer(kv, "qkv_epilogue");
    if (n_tokens == 0) return;
    if (kv.head_dim % 2 != 0) invalid_argument("qkv_epilogue: head_dim must be even for RoPE");
    qkv_epilogue_kernel<<<n_tokens, 256, 0, stream>>>(qkv, n_heads, clip, inv_freq, meta, kv, q_out);
    DBRX_CUDA_LAUNCH_CHECK();
}

void route_topk(const float *logits, int32_t n_tokens, int32_t n_experts, int32_t top_k, float norm_p,
                int32_t *experts, float *weights, cudaStream_t stream) {
    if (n_experts > kMaxExperts || top_k > n_experts || top_k < 1)
        fail(DBRX_ERR_UNSUPPORTED, "CUDA router: needs 1 <= top_k <= n_experts <= 64, got top_k " +
                                       std::to_string(top_k) + " of " + std::to_string(n_experts));
    if (n_tokens == 0) return;
    route_kernel<<<(n_tokens + 3) / 4, 128, 0, stream>>>(logits, n_tokens, n_experts, top_k, norm_p, experts, weights);
    DBRX_CUDA_LAUNCH_CHECK();
}

void moe_permute(const int32_t *experts, int32_t n_tokens, int32_t n_experts, int32_t top_k, int32_t *offsets,
                 int32_t *active, int32_t *perm_row, int32_t *row_token, cudaStream_t stream) {
    permute_kernel<<<1, 1024, 0, stream>>>(experts, n_tokens * top_k, n_experts, offsets, active, perm_row, row_token,
                                           top_k);
    DBRX_CUDA_LAUNCH_CHECK();
}

void gather_rows(const bf16_t *x, const int32_t *row_token, bf16_t *xp, int32_t n_rows, int32_t d,
                 cudaStream_t stream) {
    if (d % 8 != 0) invalid_argument("gather_rows: d_model must be a multiple of 8");
    if (n_rows == 0) return;
    gather_rows_kernel<<<n_rows, 128, 0, stream>>>(reinterpret_cast<const uint4 *>(x), row_token,
                                                   reinterpret_cast<uint4 *>(xp), d / 8);
    DBRX_CUDA_LAUNCH_CHECK();
}

void silu_mul(const float *gu, bf16_t *g, int32_t n_rows, int32_t ffn, cudaStream_t stream) {
    if (n_rows == 0) return;
    silu_mul_kernel<<<grid_for(static_cast<int64_t>(n_rows) * ffn, 256), 256, 0, stream>>>(gu, g, n_rows, ffn);
    DBRX_CUDA_LAUNCH_CHECK();
}

void moe_unpermute(const float *y, int32_t n_parts, int64_t part_stride, const int32_t *perm_row,
                   const float *weights, int32_t n_tokens, int32_t top_k, int32_t d, float *h, cudaStream_t stream) {
    if (n_tokens == 0) return;
    // About four blocks per SM in total, however few the tokens.
    const int32_t col_blocks = std::max(1, std::min((d + 63) / 64, (528 + n_tokens - 1) / n_tokens));
    unpermute_kernel<<<dim3(n_tokens, col_blocks), 64, 0, stream>>>(y, n_parts, part_stride, perm_row, weights, top_k,
                                                                    d, h);
    DBRX_CUDA_LAUNCH_CHECK();
}

int32_t read_probe(const bf16_t *p, int64_t n, float *out, cudaStream_t stream) {
    int sms = 0, dev = 0;
    DBRX_CUDA_CHECK(cudaGetDevice(&dev));
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    const int32_t blocks = sms * 8;
    read_probe_kernel<<<blocks, 512, 0, stream>>>(reinterpret_cast<const uint4 *>(p), n / 8, out);
    DBRX_CUDA_LAUNCH_CHECK();
    return blocks;
}

void fill_uniform(bf16_t *p, int64_t n, uint64_t seed, float mean, float half_range, cudaStream_t stream) {
    if (n == 0) return;
    fill_uniform_kernel<<<grid_for(n, 256), 256, 0, stream>>>(p, n, seed, mean, half_range);
    DBRX_CUDA_LAUNCH_CHECK();
}

}  // namespace dbrx::cuda
