// Shared by the decode-attention kernels (attention*.cu): the split policy and the layout of the
// partial softmax states that the merge kernel combines.
//
// Batch invariance: in batch-invariant launches (attention()'s batch_invariant, the default) a
// token's split boundaries depend only on its own context length, so its output is bitwise the
// same whatever else is in the launch; the grid's split count (from max_ctx)
// only bounds how many splits exist, CTAs past a token's last split exit at once.
#pragma once

#include <cstdint>

#include "backend/cuda/kernels.h"

namespace dbrx::cuda::attn {

// Keys per split, by context length: about 16-32 splits per token up to 32K keys, so that one
// sequence alone fills the GPU about once (8 KV heads x 32 splits = 256 CTAs, 2 per SM) while a
// large batch does not pay for many small splits' partial states.
constexpr int32_t kShortCtx = 4096, kMidCtx = 16384;
// `shift` (0 in batch-invariant launches) makes every split 2^shift times longer: launches outside
// batch-invariant mode large enough to give each CTA several splits take fewer, longer ones instead.
__host__ __device__ __forceinline__ int32_t split_len(int32_t ctx, int32_t shift = 0) {
    return (ctx <= kShortCtx ? 256 : ctx <= kMidCtx ? 512 : 1024) << shift;
}
__host__ __device__ __forceinline__ int32_t n_splits(int32_t ctx, int32_t shift = 0) {
    const int32_t len = split_len(ctx, shift);
    return (ctx + len - 1) / len;
}
// Keys [begin, end) of split `s` of a token with `ctx` keys in a grid of `grid_splits` splits. The
// last grid split takes any remainder, so a context beyond max_ctx is still attended in full.
__host__ __device__ __forceinline__ void split_range(int32_t ctx, int32_t s, int32_t grid_splits, int32_t &begin,
                                                     int32_t &end, int32_t shift = 0) {
    const int32_t len = split_len(ctx, shift);
    begin = s * len;
    end = s == grid_splits - 1 ? ctx : (begin + len < ctx ? begin + len : ctx);
}

constexpr float kLog2e = 1.4426950408889634f;

// Partial state of one (token slot, query head, split): m (running max of the scores in log2
// units), l (sum of 2^(s - m)), two pad words so that the head_dim unnormalised output accumulators
// that follow start 16-byte aligned (the fused merge reads them as float4).
constexpr int32_t kPartialHead = 4;
__host__ __device__ __forceinline__ int64_t partial_stride(int32_t hd) { return hd + kPartialHead; }
__device__ __forceinline__ float *partial(float *scratch, int64_t slot, int32_t n_heads, int32_t head, int32_t splits,
                                          int32_t split, int32_t hd) {
    return scratch + ((slot * n_heads + head) * splits + split) * partial_stride(hd);
}

// Arrival counters of the fused merge (attention_mma.cu): one per (token of a launch, KV head) in
// one of kCounterBanks banks of kCounterBankSize, zero when the module loads. The last split CTA of
// a (token, KV head) to arrive merges the splits and puts its counter back to zero, so every launch
// (and every replay of a captured one) finds its counters zero. Each live stream holds its own bank
// (given back when its Stream is destroyed), so launches on different streams never share a
// counter; a launch covers at most
// kCounterBankSize / n_kv_heads tokens (larger ones go in slices of the same kernel).
constexpr int32_t kCounterBanks = 16;
constexpr int32_t kCounterBankSize = 64 * 1024;
// The bank of `stream` on the current device: assigned on first use, the lowest one no other live
// stream of the device holds; UNSUPPORTED past kCounterBanks live streams.
int32_t counter_bank(cudaStream_t stream);

struct Launch {
    const float *q;
    int32_t n_heads;
    TokenMeta meta;
    KvLayer kv;
    int32_t splits;
    float *scratch;  // partial states, partial_stride(hd) floats per (slot, head, split)
    uint16_t *out;
    const int32_t *tok_list;
    bool batch_invariant;  // false: the tensor-core path may lengthen splits (split_len's shift)
};

// Tensor-core path (head_dim 16, 32, 64 or 128, up to 16 query heads per KV head): writes the output
// itself (one split: directly; more: the last split CTA to finish merges the token's partials).
// Returns false if unsupported.
bool launch_mma(const Launch &a, int32_t n_tokens, cudaStream_t stream);
// Generic fp32 path for any head_dim <= 256 and up to 8 query heads per KV head: always partials.
void launch_generic(const Launch &a, int32_t n_tokens, cudaStream_t stream);

}  // namespace dbrx::cuda::attn
