#include "backend/cuda/logits.h"

#include <cmath>
#include <string>

#include "backend/cuda/device_math.cuh"

namespace dbrx::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = LogitsReducer::kChunk / kThreads;  // 16
constexpr int kWarps = kThreads / 32;
static_assert(LogitsReducer::kMaxChunks * kMaxLogitsCandidates <= kThreads * kPerThread,
              "the merge holds every chunk's candidates in registers");

struct DeviceNeed {
    int32_t top_n;
    float inv_t;  // 1.0f / temperature as the sampler computes it; 0: no scaled sum
};

struct ChunkStats {
    float max, max_t;  // finite max of l and of l * inv_t (-inf when none)
    int32_t n_finite, n_nan_or_pos_inf;
    double sum, sum_t;  // relative to max / max_t
};

// Orders like the sampler: value descending (-0 == +0; NaN below -inf), then id ascending. Unique
// per id; 0 is below every real key and pads.
__device__ __forceinline__ uint64_t order_key(float v, int32_t id) {
    uint32_t u = 1;
    if (!isnan(v)) {
        const uint32_t bits = __float_as_uint(v == 0.0f ? 0.0f : v);
        u = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    }
    return (static_cast<uint64_t>(u) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(id));
}
__device__ __forceinline__ int32_t key_id(uint64_t k) {
    return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(k));
}

template <class T, class Op> __device__ T block_reduce(T v, Op op, T *scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
    return r;
}

struct MaxF {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumD {
    __device__ double operator()(double a, double b) const { return a + b; }
};
struct SumI {
    __device__ int32_t operator()(int32_t a, int32_t b) const { return a + b; }
};

struct SelectShared {
    uint32_t hist[256];
    uint64_t picked[kMaxLogitsCandidates];
    int32_t n_picked, digit, above;
};

// The `want` largest of the block's keys (k: kPerThread per thread, unique except the 0 padding,
// want <= the number of real keys), sorted descending into sorted[0 .. want). Radix select, 8 bits
// a pass from the top, stopping as soon as the threshold's bucket is taken whole.
__device__ void select_top(const uint64_t (&k)[kPerThread], int want, SelectShared &sh, uint64_t *sorted) {
    const int lane = threadIdx.x % 32;
    uint64_t prefix = 0, mask = 0;
    int remaining = want;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += kThreads) sh.hist[i] = 0;
        __syncthreads();
#pragma unroll
        for (int e = 0; e < kPerThread; ++e) {
            const bool in = (k[e] & mask) == prefix;
            const uint32_t bin = in ? static_cast<uint32_t>(k[e] >> shift) & 255u : 256u;
            const uint32_t peers = __match_any_sync(0xffffffffu, bin);  // one atomic per distinct bin
            if (in && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[bin], __popc(peers));
        }
        __syncthreads();
        if (threadIdx.x < 32) {  // lane l scans bins 255 - 8l down to 248 - 8l
            int counts[8], total = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) total += counts[j] = static_cast<int>(sh.hist[255 - 8 * lane - j]);
            int inclusive = total;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, inclusive, o);
                if (lane >= o) inclusive += v;
            }
            int above = inclusive - total;
            if (above < remaining && inclusive >= remaining) {
                for (int j = 0; j < 8; ++j) {
                    if (above + counts[j] >= remaining) {
                        sh.digit = 255 - 8 * lane - j;
                        sh.above = above;
                        break;
                    }
                    above += counts[j];
                }
            }
        }
        __syncthreads();
        const int digit = sh.digit;
        remaining -= sh.above;
        prefix |= static_cast<uint64_t>(digit) << shift;
        mask |= uint64_t{255} << shift;
        const bool whole = static_cast<int>(sh.hist[digit]) == remaining;
        __syncthreads();  // everyone has read hist before the next pass clears it
        if (whole) break;
    }
    if (threadIdx.x == 0) sh.n_picked = 0;
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
        if (k[e] != 0 && k[e] >= prefix) {
            const int slot = atomicAdd(&sh.n_picked, 1);
            if (slot < kMaxLogitsCandidates) sh.picked[slot] = k[e];
        }
    }
    __syncthreads();
    if (threadIdx.x < want) {
        const uint64_t mine = sh.picked[threadIdx.x];
        int rank = 0;
        for (int j = 0; j < want; ++j) rank += sh.picked[j] > mine;
        sorted[rank] = mine;
    }
}

__global__ void __launch_bounds__(kThreads) chunk_kernel(const float *__restrict__ logits, int32_t vocab,
                                                        const DeviceNeed *__restrict__ needs,
                                                        ChunkStats *__restrict__ stats, uint64_t *__restrict__ keys) {
    __shared__ SelectShared sh;
    __shared__ double scratch_d[kWarps];
    __shared__ float scratch_f[kWarps];
    __shared__ int32_t scratch_i[kWarps];
    const int row = blockIdx.y, chunk = blockIdx.x;
    const DeviceNeed need = needs[row];
    const float *x = logits + static_cast<int64_t>(row) * vocab;
    const int begin = chunk * LogitsReducer::kChunk;
    const int len = min(LogitsReducer::kChunk, vocab - begin);

    float v[kPerThread];
    float m = -INFINITY, m_t = -INFINITY;
    int32_t n_finite = 0, n_bad = 0;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
        const int i = e * kThreads + threadIdx.x;
        v[e] = i < len ? __ldcs(x + begin + i) : -INFINITY;
        if (i < len) {
            if (isfinite(v[e])) {
                ++n_finite;
                m = fmaxf(m, v[e]);
                const float s = __fmul_rn(v[e], need.inv_t);
                if (need.inv_t > 0 && isfinite(s)) m_t = fmaxf(m_t, s);
            } else if (!(v[e] < 0)) {
                ++n_bad;
            }
        }
    }
    m = block_reduce(m, MaxF{}, scratch_f);
    m_t = block_reduce(m_t, MaxF{}, scratch_f);
    n_finite = block_reduce(n_finite, SumI{}, scratch_i);
    n_bad = block_reduce(n_bad, SumI{}, scratch_i);
    double sum = 0, sum_t = 0;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
        if (!isfinite(v[e])) continue;  // padding is -inf
        sum += exp(static_cast<double>(v[e]) - m);
        const float s = __fmul_rn(v[e], need.inv_t);
        if (need.inv_t > 0 && isfinite(s)) sum_t += exp(static_cast<double>(s) - m_t);
    }
    sum = block_reduce(sum, SumD{}, scratch_d);
    sum_t = block_reduce(sum_t, SumD{}, scratch_d);
    ChunkStats *out = stats + static_cast<int64_t>(row) * gridDim.x + chunk;
    if (threadIdx.x == 0) *out = ChunkStats{m, m_t, n_finite, n_bad, sum, sum_t};

    const int want = min(need.top_n, len);
    uint64_t *chunk_keys = keys + (static_cast<int64_t>(row) * gridDim.x + chunk) * kMaxLogitsCandidates;
    for (int r = want + threadIdx.x; r < kMaxLogitsCandidates; r += kThreads) chunk_keys[r] = 0;
    if (want == 0) return;
    uint64_t k[kPerThread];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
        const int i = e * kThreads + threadIdx.x;
        k[e] = i < len ? order_key(v[e], begin + i) : 0;
    }
    select_top(k, want, sh, chunk_keys);
}

__global__ void __launch_bounds__(kThreads) merge_kernel(const float *__restrict__ logits, int32_t vocab, int32_t n_chunks,
                                                        const DeviceNeed *__restrict__ needs,
                                                        const ChunkStats *__restrict__ stats,
                                                        const uint64_t *__restrict__ keys, LogitsSummary *__restrict__ out) {
    __shared__ SelectShared sh;
    __shared__ uint64_t sorted[kMaxLogitsCandidates];
    const int row = blockIdx.x;
    const DeviceNeed need = needs[row];
    LogitsSummary &o = out[row];
    if (threadIdx.x < 32) {
        const ChunkStats *st = stats + static_cast<int64_t>(row) * n_chunks;
        float m = -INFINITY, m_t = -INFINITY;
        int32_t n_finite = 0, n_bad = 0;
        for (int c = threadIdx.x; c < n_chunks; c += 32) {
            m = fmaxf(m, st[c].max);
            m_t = fmaxf(m_t, st[c].max_t);
            n_finite += st[c].n_finite;
            n_bad += st[c].n_nan_or_pos_inf;
        }
        double sum = 0, sum_t = 0;
        m = warp_max(m);
        m_t = warp_max(m_t);
        for (int c = threadIdx.x; c < n_chunks; c += 32) {
            if (st[c].max > -INFINITY) sum += st[c].sum * exp(static_cast<double>(st[c].max) - m);
            if (st[c].max_t > -INFINITY) sum_t += st[c].sum_t * exp(static_cast<double>(st[c].max_t) - m_t);
        }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
            sum += __shfl_xor_sync(0xffffffffu, sum, s);
            sum_t += __shfl_xor_sync(0xffffffffu, sum_t, s);
            n_finite += __shfl_xor_sync(0xffffffffu, n_finite, s);
            n_bad += __shfl_xor_sync(0xffffffffu, n_bad, s);
        }
        if (threadIdx.x == 0) {
            o.max_logit = m;
            o.n_finite = n_finite;
            o.n_nan_or_pos_inf = n_bad;
            o.sum_exp = sum;
            o.sum_exp_t = need.inv_t > 0 ? sum_t : 0.0;
        }
    }
    const int want = min(need.top_n, vocab);
    if (threadIdx.x == 0) o.n_candidates = want;
    if (want == 0) return;
    const uint64_t *row_keys = keys + static_cast<int64_t>(row) * n_chunks * kMaxLogitsCandidates;
    const int n_keys = n_chunks * kMaxLogitsCandidates;
    uint64_t k[kPerThread];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
        const int i = e * kThreads + threadIdx.x;
        k[e] = i < n_keys ? row_keys[i] : 0;
    }
    select_top(k, want, sh, sorted);
    __syncthreads();
    if (threadIdx.x < want) {
        const int32_t id = key_id(sorted[threadIdx.x]);
        o.ids[threadIdx.x] = id;
        o.logits[threadIdx.x] = logits[static_cast<int64_t>(row) * vocab + id];
    }
}

}  // namespace

void LogitsReducer::enqueue(const float *logits, int32_t n_rows, int32_t vocab, std::span<const LogitsNeed> needs,
                            cudaStream_t stream) {
    if (!supports(vocab))
        invalid_argument("logits summary: vocab " + std::to_string(vocab) + " exceeds " +
                         std::to_string(kChunk * kMaxChunks));
    if (n_rows < 0 || needs.size() != static_cast<size_t>(n_rows))
        invalid_argument("logits summary: " + std::to_string(needs.size()) + " needs for " + std::to_string(n_rows) +
                         " rows");
    n_rows_ = n_rows;
    vocab_ = vocab;
    if (n_rows == 0) return;
    const int32_t n_chunks = (vocab + kChunk - 1) / kChunk;
    host_needs_.reserve(sizeof(DeviceNeed) * n_rows);
    auto *hn = host_needs_.as<DeviceNeed>();
    for (int32_t r = 0; r < n_rows; ++r) {
        const LogitsNeed &n = needs[static_cast<size_t>(r)];
        if (n.top_n < 0 || n.top_n > kMaxLogitsCandidates || !(n.temperature >= 0))
            invalid_argument("logits summary: row " + std::to_string(r) + " asks for top_n " + std::to_string(n.top_n) +
                             " at temperature " + std::to_string(n.temperature));
        hn[r] = DeviceNeed{n.top_n, n.temperature > 0 ? 1.0f / n.temperature : 0.0f};
    }
    needs_.reserve(sizeof(DeviceNeed) * n_rows, "logits summary needs");
    chunk_stats_.reserve(sizeof(ChunkStats) * n_rows * n_chunks, "logits summary chunk statistics");
    chunk_keys_.reserve(sizeof(uint64_t) * n_rows * n_chunks * kMaxLogitsCandidates, "logits summary chunk candidates");
    out_.reserve(sizeof(LogitsSummary) * n_rows, "logits summaries");
    host_out_.reserve(sizeof(LogitsSummary) * n_rows);
    DBRX_CUDA_CHECK(cudaMemcpyAsync(needs_.get(), hn, sizeof(DeviceNeed) * n_rows, cudaMemcpyHostToDevice, stream));
    chunk_kernel<<<dim3(n_chunks, n_rows), kThreads, 0, stream>>>(logits, vocab, needs_.as<DeviceNeed>(),
                                                                  chunk_stats_.as<ChunkStats>(), chunk_keys_.as<uint64_t>());
    DBRX_CUDA_LAUNCH_CHECK();
    merge_kernel<<<n_rows, kThreads, 0, stream>>>(logits, vocab, n_chunks, needs_.as<DeviceNeed>(),
                                                  chunk_stats_.as<ChunkStats>(), chunk_keys_.as<uint64_t>(),
                                                  out_.as<LogitsSummary>());
    DBRX_CUDA_LAUNCH_CHECK();
    DBRX_CUDA_CHECK(cudaMemcpyAsync(host_out_.get(), out_.get(), sizeof(LogitsSummary) * n_rows,
                                    cudaMemcpyDeviceToHost, stream));
}

}  // namespace dbrx::cuda
