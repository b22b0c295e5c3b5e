// fp32 reference kernels of the DBRX forward pass over bf16 weights (converted on the fly).
// Every output element is computed by exactly one thread with a loop order that depends only on the
// element itself (never on how many tokens share the call or how work is split across threads), so
// results are bitwise reproducible across batch composition, prefill chunking and thread count.
// The CUDA backend tests its kernels against these; the multi-GPU code reuses them.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "util/bf16.h"
#include "util/thread_pool.h"

namespace dbrx::cpu {

constexpr float kLayerNormEps = 1e-5f;

// Roughly the multiply-adds (about 20 us) worth waking another thread for; smaller loops stay on
// the calling thread, since decode steps of small models are otherwise dominated by wake-ups.
constexpr int64_t kMinSliceWork = int64_t{1} << 17;

// Items per parallel slice when each item costs `work_per_item` multiply-adds.
inline int64_t slice_grain(int64_t work_per_item) {
    return work_per_item <= 0 ? kMinSliceWork : (kMinSliceWork + work_per_item - 1) / work_per_item;
}

// dst[i] = float(src[i]).
void bf16_to_f32(const bf16_t *src, float *dst, int64_t n);

// sum_i a[i] * b[i] in one fixed fp32 order, used by every kernel: over the first n - n % 8 elements,
// lane j (0..7) accumulates a[i] * b[i] for i = j mod 8 in increasing i; then lanes fold pairwise
// (j += j + 4, then j += j + 2, then j += j + 1); then the tail elements are added in order. No FMA.
float dot(const float *a, const float *b, int64_t n);

// y[t] = (x[t] - mean) / sqrt(var + eps) * w  (no bias), per token t of n_tokens rows of width d.
// Mean and variance accumulate in double. x and y may alias.
void layernorm(const float *x, const bf16_t *w, float *y, int64_t n_tokens, int64_t d, ThreadPool &pool,
               float eps = kLayerNormEps);

// y[t][n] = dot(x[t], W[n]) for W [n_out, k] row-major bf16 (torch Linear: y = x W^T).
// Threads split the output columns; each weight row is converted once per call for all tokens.
void gemm_xwt(const float *x, int64_t n_tokens, int64_t k, const bf16_t *w, int64_t n_out, float *y,
              ThreadPool &pool);

// y[t][n] = sum_{j=0..k-1} x[t][j] * W[j][n] (sequential in j) for W [k, n_out] row-major bf16
// (the DBRX expert down projection, w2 is not transposed). Threads split the output columns.
void gemm_xw(const float *x, int64_t n_tokens, int64_t k, const bf16_t *w, int64_t n_out, float *y,
             ThreadPool &pool);

// x[i] = clamp(x[i], -limit, limit).
void clamp(float *x, int64_t n, float limit);

// inv_freq[i] = 1 / theta^(2i / head_dim), computed in double and rounded to fp32; head_dim / 2 values.
std::vector<float> rope_inv_freq(int32_t head_dim, double theta);

// cos/sin of the angles pos * inv_freq[i] (fp32 product, fp32 cos/sin), head_dim / 2 values each.
void rope_cos_sin(int32_t pos, std::span<const float> inv_freq, float *cos_out, float *sin_out);

// Rotate-half (NeoX) RoPE in place on n_heads contiguous heads of head_dim (even) values:
// x1' = x1 c - x2 s, x2' = x2 c + x1 s with x1 = first half, x2 = second half.
void rope_apply(float *x, int32_t n_heads, int32_t head_dim, const float *cos, const float *sin);

// Keys/values of one layer in a paged pool: block b holds K at k + b * block_stride and V at
// v + b * block_stride, each laid out [block_size][n_kv_heads][head_dim].
struct PagedKv {
    const float *k = nullptr;
    const float *v = nullptr;
    int64_t block_stride = 0;
    int32_t block_size = 0;
    int32_t n_kv_heads = 0;
    int32_t head_dim = 0;
};

// Causal attention of one query head q [head_dim] at position `pos` over keys 0..pos of KV head
// kv_head, found through the block table. Scores = dot(q, k) * scale, softmax with max subtraction,
// out = (sum_j e_j v_j) / sum_j e_j, all sequential in j. scores needs pos + 1 floats of scratch.
void attend_one(const float *q, int32_t pos, const PagedKv &kv, std::span<const int32_t> blocks,
                int32_t kv_head, float scale, float *scores, float *out);

// Router: softmax (fp32, max subtracted) of logits [n_experts], top-k by probability with ties going
// to the lower expert index, weights divided by their p-norm when norm_p is set.
// experts/weights receive top_k values in rank order.
void route(const float *logits, int32_t n_experts, int32_t top_k, std::optional<double> norm_p,
           int32_t *experts, float *weights);

// g[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)).
void silu_mul(const float *gate, const float *up, float *g, int64_t n);

// Routed experts of one MoE layer, added to the residual: for each token t,
// h[t] += sum_{r=0..top_k-1} weights[t][r] * expert(experts[t][r], x[t]) with the rank sum in order,
// expert(e, x) = (silu(x W1e^T) * (x V1e^T)) W2e and W*e = rows [e*ffn, (e+1)*ffn) of w1/v1/w2.
// Tokens are grouped per expert for weight reuse; each token's arithmetic is independent of the group.
void moe_experts(const float *x, int64_t n_tokens, int32_t d_model, int32_t ffn, int32_t n_experts, int32_t top_k,
                 const int32_t *experts, const float *weights, const bf16_t *w1, const bf16_t *v1,
                 const bf16_t *w2, float *h, ThreadPool &pool);

}  // namespace dbrx::cpu
