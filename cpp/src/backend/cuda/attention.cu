// Causal paged attention for decode and short prefill chunks (GQA): the host entry points, the split
// policy's grid bound, the fused merge's counter banks, and the merge kernel of the generic path's
// split partial states (flash-decoding). The kernels live in attention_mma.cu (tensor cores: DBRX
// and both fixtures; merges its own splits) and attention_generic.cu (other shapes).
#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_math.cuh"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace {

// One block per (token slot, query head): combines the token's splits in split order, so the result
// depends only on the token's own context. The splits' (m, l) go to shared memory first
// and each thread keeps kUnroll partial outputs in flight, so long split lists are not latency-bound.
constexpr int kMergeThreads = 128;
constexpr int kUnroll = 8;
constexpr int32_t kMaxMergeSplits = 48 * 1024 / (2 * sizeof(float));

__global__ void __launch_bounds__(kMergeThreads)
    attention_merge_kernel(const float *scratch, const int32_t *pos, int32_t n_heads, int32_t hd, int32_t splits,
                           uint16_t *out, const int32_t *tok_list) {
    extern __shared__ float ml[];  // m[splits], then l[splits]
    const int32_t slot = blockIdx.x, t = tok_list ? tok_list[slot] : slot, h = blockIdx.y;
    const int32_t ns = min(attn::n_splits(pos[t] + 1), splits);
    asm volatile("griddepcontrol.wait;\n" ::: "memory");  // the attention grid's partials are complete
    const float *p0 = attn::partial(const_cast<float *>(scratch), slot, n_heads, h, splits, 0, hd);
    const int64_t stride = attn::partial_stride(hd);
    float *ms = ml, *ls = ml + splits;
    for (int32_t s = threadIdx.x; s < ns; s += blockDim.x) {
        ms[s] = p0[s * stride];
        ls[s] = p0[s * stride + 1];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int32_t s = 0; s < ns; ++s) M = fmaxf(M, ms[s]);
    float L = 0.f;
    for (int32_t s = 0; s < ns; ++s) L += ls[s] * exp2f(ms[s] - M);
    for (int32_t dim = threadIdx.x; dim < hd; dim += blockDim.x) {
        float A = 0.f;
        for (int32_t s0 = 0; s0 < ns; s0 += kUnroll) {
            float v[kUnroll];
#pragma unroll
            for (int i = 0; i < kUnroll; ++i) v[i] = s0 + i < ns ? p0[(s0 + i) * stride + attn::kPartialHead + dim] : 0.f;
#pragma unroll
            for (int i = 0; i < kUnroll; ++i)
                if (s0 + i < ns) A += v[i] * exp2f(ms[s0 + i] - M);
        }
        out[(static_cast<int64_t>(t) * n_heads + h) * hd + dim] = f2bf(A / L);
    }
}

}  // namespace

// The largest split count of any context up to max_ctx (n_splits grows within each split-length
// regime, so the regimes' ends bound it). n_tokens and n_kv_heads do not enter: the splits of a
// token must not depend on the rest of the batch.
int32_t attention_splits(int32_t /*n_tokens*/, int32_t /*n_kv_heads*/, int32_t max_ctx) {
    if (max_ctx <= 1) return 1;
    int32_t s = attn::n_splits(std::min(max_ctx, attn::kShortCtx));
    if (max_ctx > attn::kShortCtx) s = std::max(s, attn::n_splits(std::min(max_ctx, attn::kMidCtx)));
    if (max_ctx > attn::kMidCtx) s = std::max(s, attn::n_splits(max_ctx));
    return s;
}

size_t attention_scratch_bytes(int32_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t splits) {
    return static_cast<size_t>(n_tokens) * n_heads * splits * attn::partial_stride(head_dim) * sizeof(float);
}

namespace attn {

namespace {

struct BankEntry {
    int dev;
    cudaStream_t stream;
    int32_t bank;
};
struct BankTable {
    std::mutex mu;
    std::vector<BankEntry> entries;
};
BankTable &bank_table() {
    static BankTable *t = new BankTable;  // never destroyed: Streams may die during static destruction
    return *t;
}

// A Stream is being destroyed: let its last launches finish (their counters return to zero), then
// free its banks for the next stream.
void release_banks(cudaStream_t stream) {
    BankTable &t = bank_table();
    std::lock_guard<std::mutex> lock(t.mu);
    const auto held = [&](const BankEntry &e) { return e.stream == stream; };
    if (std::none_of(t.entries.begin(), t.entries.end(), held)) return;
    cudaStreamSynchronize(stream);
    cudaGetLastError();  // a destructor path: an error here belongs to the stream's owner
    t.entries.erase(std::remove_if(t.entries.begin(), t.entries.end(), held), t.entries.end());
}

}  // namespace

int32_t counter_bank(cudaStream_t stream) {
    static const bool hooked = (add_stream_retire_hook(release_banks), true);
    (void)hooked;
    int dev = 0;
    DBRX_CUDA_CHECK(cudaGetDevice(&dev));
    BankTable &t = bank_table();
    std::lock_guard<std::mutex> lock(t.mu);
    bool used[kCounterBanks] = {};
    for (const BankEntry &e : t.entries) {
        if (e.dev != dev) continue;
        if (e.stream == stream) return e.bank;
        used[e.bank] = true;
    }
    // Live streams never share a bank: Streams give theirs back when destroyed (release_banks).
    for (int32_t b = 0; b < kCounterBanks; ++b)
        if (!used[b]) {
            t.entries.push_back({dev, stream, b});
            return b;
        }
    fail(DBRX_ERR_UNSUPPORTED, "CUDA decode attention: more than " + std::to_string(kCounterBanks) +
                                   " streams use it at once on device " + std::to_string(dev) +
                                   " (one per CUDA model or rank); free a model first");
}

}  // namespace attn

void attention(const float *q, int32_t n_tokens, int32_t n_heads, TokenMeta meta, KvLayer kv, int32_t max_ctx,
               int32_t splits, void *scratch, bf16_t *out, cudaStream_t stream, const int32_t *tok_list,
               bool batch_invariant) {
    (void)max_ctx;  // sizes nothing here: `splits` (from attention_splits(max_ctx)) is the grid bound
    check_kv_layer(kv, "CUDA attention");
    if (n_tokens == 0) return;
    if (splits < 1 || splits > kMaxMergeSplits)
        invalid_argument("CUDA attention: splits must be in [1, " + std::to_string(kMaxMergeSplits) + "], got " +
                         std::to_string(splits));
    if (kv.n_kv_heads < 1 || n_heads % kv.n_kv_heads != 0)
        fail(DBRX_ERR_UNSUPPORTED, "CUDA attention: " + std::to_string(n_heads) + " query heads do not group over " +
                                       std::to_string(kv.n_kv_heads) + " KV heads");
    attn::Launch a{q, n_heads, meta, kv, splits, static_cast<float *>(scratch), out, tok_list, batch_invariant};
    if (attn::launch_mma(a, n_tokens, stream)) return;  // the tensor-core kernel merges its own splits
    if (kv.head_dim > 256 || n_heads / kv.n_kv_heads > 8)
        fail(DBRX_ERR_UNSUPPORTED, "CUDA attention: needs head_dim <= 256 and at most 8 query heads per KV head "
                                   "(16 for head_dim 16/32/64/128), got " +
                                       std::to_string(kv.head_dim) + " and " + std::to_string(n_heads) + "/" +
                                       std::to_string(kv.n_kv_heads));
    attn::launch_generic(a, n_tokens, stream);
    // Programmatic dependent launch: the merge's launch overlaps the attention grid's tail.
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(n_tokens, n_heads);
    cfg.blockDim = dim3(kMergeThreads);
    cfg.dynamicSmemBytes = 2 * sizeof(float) * splits;
    cfg.stream = stream;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    DBRX_CUDA_CHECK(cudaLaunchKernelEx(&cfg, attention_merge_kernel, static_cast<const float *>(scratch), meta.pos,
                                       n_heads, kv.head_dim, splits, reinterpret_cast<uint16_t *>(out), tok_list));
}

}  // namespace dbrx::cuda
