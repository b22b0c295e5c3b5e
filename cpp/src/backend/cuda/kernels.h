// Host launchers of the CUDA backend's own kernels (everything that is not a cuBLAS GEMM).
// Activations: the residual stream is fp32, GEMM inputs are bf16, GEMM outputs fp32; weights and
// the KV cache are bf16. All pointers are device pointers unless named host_*; every launcher
// enqueues on `stream` and returns without synchronising.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "util/bf16.h"

namespace dbrx::cuda {

// Per-token metadata of one step, on the device. Token t belongs to sequence seq[t] at position
// pos[t]; that sequence's block table is blocks[block_off[seq[t]] ...].
struct TokenMeta {
    const int32_t *pos = nullptr;
    const int32_t *seq = nullptr;
    const int32_t *block_off = nullptr;
    const int32_t *blocks = nullptr;
};

// How one block of a layer's paged KV is laid out (K and V alike, bf16):
//   HeadMajor [n_kv_heads][block_size][head_dim] (vLLM's): one KV head's keys of a block are one
//             contiguous run of block_size * head_dim values (4 KB for DBRX), so a CTA reading one
//             head streams whole DRAM pages.
//   SlotMajor [block_size][n_kv_heads][head_dim]: one position's heads are contiguous; a CTA reading
//             one head reads head_dim-value rows n_kv_heads * head_dim values apart, and the CTAs
//             of a token's KV heads, which run side by side, read whole rows together. The CUDA
//             pool's default: measured faster for decode on the H200 (CudaKvPool::default_layout).
enum class KvLayout : int32_t { HeadMajor, SlotMajor };
inline const char *kv_layout_name(KvLayout l) { return l == KvLayout::HeadMajor ? "head-major" : "slot-major"; }

// One layer's paged KV: block b holds K at base + b * block_stride and V at base + b * block_stride
// + v_offset. The head_dim values of (block b, slot j, KV head h) start kv_offset(kv, b, j, h)
// values past K's base (V: + v_offset): head_stride and row_stride say the layout. Build one with
// kv_layer(); the launchers refuse a KvLayer whose strides do not fit in its blocks (zero strides
// from an aggregate initialisation that left them out, say).
struct KvLayer {
    bf16_t *base = nullptr;
    int64_t block_stride = 0;
    int64_t v_offset = 0;
    int32_t block_size = 0;
    int32_t n_kv_heads = 0;
    int32_t head_dim = 0;
    int64_t head_stride = 0;  // between KV heads of one slot
    int64_t row_stride = 0;   // between slots of one KV head
};

// The one offset computation of the paged KV, for every kernel and test.
__host__ __device__ __forceinline__ int64_t kv_offset(const KvLayer &kv, int64_t block, int32_t slot, int32_t kv_head) {
    return block * kv.block_stride + kv_head * kv.head_stride + slot * kv.row_stride;
}

// A layer of `layout` at `base`: blocks of K then V, each block_size * n_kv_heads * head_dim values.
inline KvLayer kv_layer(bf16_t *base, int32_t block_size, int32_t n_kv_heads, int32_t head_dim, KvLayout layout) {
    KvLayer k;
    const int64_t half = int64_t{block_size} * n_kv_heads * head_dim;
    k.base = base;
    k.block_stride = 2 * half;
    k.v_offset = half;
    k.block_size = block_size;
    k.n_kv_heads = n_kv_heads;
    k.head_dim = head_dim;
    k.head_stride = layout == KvLayout::HeadMajor ? int64_t{block_size} * head_dim : head_dim;
    k.row_stride = layout == KvLayout::HeadMajor ? head_dim : int64_t{n_kv_heads} * head_dim;
    return k;
}

// INVALID_ARGUMENT naming `where` unless kv's shape is positive and every (slot, KV head) row lies
// inside its block's K half, and V's inside the block.
void check_kv_layer(const KvLayer &kv, const char *where);

// h[t] = float(wte[ids[t]]).
void embed(const int32_t *ids, const bf16_t *wte, float *h, int32_t n_tokens, int32_t d, cudaStream_t stream);

// y[i] = bf16(layernorm(x[rows ? rows[i] : i]) * w), no bias, eps 1e-5, statistics in fp32.
void layernorm(const float *x, const int32_t *rows, const bf16_t *w, bf16_t *y, int32_t n_rows, int32_t d,
               cudaStream_t stream);

// qkv [T][d + 2 kv hd] (fp32 GEMM output): clamp to +-clip (clip <= 0: none), rotate-half RoPE on q
// and k at each token's position (inv_freq: head_dim/2 fp32 values), q written to q_out [T][H][hd]
// fp32, k and v written into the paged cache at the token's slot.
void qkv_epilogue(const float *qkv, int32_t n_tokens, int32_t n_heads, float clip, const float *inv_freq,
                  TokenMeta meta, KvLayer kv, float *q_out, cudaStream_t stream);

// Causal paged attention: token t (query heads q[t][H][hd]) attends to positions 0..pos[t] of its
// sequence. One thread block reads each key once for the H / n_kv query heads sharing it (tensor
// cores for head_dim 16/32/64/128); long contexts are split (flash-decoding) and the splits' partial
// softmax states merged in a fixed order. Batch invariant: a token's splits depend only on its own
// context pos[t] + 1, so its output bytes do not depend on the other tokens, n_tokens or max_ctx.
// attention_splits gives the grid bound for contexts up to max_ctx (it ignores n_tokens and
// n_kv_heads); a launch may use a larger bound (a bucketed max_ctx) and be replayed in a CUDA graph.
// tok_list (nullable) restricts the call to n_tokens listed tokens (indices into the step's tokens).
// The tensor-core path overlaps its start with the preceding kernel (programmatic dependent launch):
// it reads `meta` and tok_list before waiting for that kernel, so they must not be written by the
// kernel enqueued just before attention() (q and the KV cache may be). scratch needs no zeroing.
int32_t attention_splits(int32_t n_tokens, int32_t n_kv_heads, int32_t max_ctx);
size_t attention_scratch_bytes(int32_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t splits);
// batch_invariant = false (the backend's default mode) lets a launch of many tokens give each CTA one
// longer split instead of several splits merged one by one: fewer partial states and no merges inside
// the CTA (6 % of the time at 64 x 8192 keys on the H200), at the price of a token's bytes
// depending on the launch size.
void attention(const float *q, int32_t n_tokens, int32_t n_heads, TokenMeta meta, KvLayer kv, int32_t max_ctx,
               int32_t splits, void *scratch, bf16_t *out, cudaStream_t stream, const int32_t *tok_list = nullptr,
               bool batch_invariant = true);

// Prefill attention on the tensor cores for chunks of at least kFlashMinTokens tokens. tiles holds
// n_tiles x {sequence, first token index, rows (<= kFlashTile), position of the first token}: a
// sequence's new tokens cut into tiles of kFlashTile consecutive positions. Same semantics as
// attention() for the tokens it covers (bf16 Q and P, fp32 accumulation).
constexpr int32_t kFlashTile = 128;
constexpr int32_t kFlashMinTokens = 16;
bool flash_prefill_supported(int32_t head_dim);
void flash_prefill(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv,
                   bf16_t *out, cudaStream_t stream);

// Router over logits [T][E] (fp32): softmax, top-k (ties to the lower expert), weights divided by
// their p-norm when norm_p > 0. experts/weights [T][k] in rank order.
void route_topk(const float *logits, int32_t n_tokens, int32_t n_experts, int32_t top_k, float norm_p,
                int32_t *experts, float *weights, cudaStream_t stream);

// Groups the T*k (token, rank) pairs by expert on the device: offsets[E+1] (rows of expert e are
// [offsets[e], offsets[e+1])), active[0] = n_active and active[1..n_active] = the experts with rows,
// perm_row[t*k + r] = the row of pair (t, r), row_token[row] = its token.
void moe_permute(const int32_t *experts, int32_t n_tokens, int32_t n_experts, int32_t top_k, int32_t *offsets,
                 int32_t *active, int32_t *perm_row, int32_t *row_token, cudaStream_t stream);

// xp[row] = x[row_token[row]] for rows [0, n_rows), bf16 rows of width d.
void gather_rows(const bf16_t *x, const int32_t *row_token, bf16_t *xp, int32_t n_rows, int32_t d,
                 cudaStream_t stream);

// g[row][j] = bf16(silu(gu[row][j]) * gu[row][F + j]) for gu [rows][2F] (gate | up).
void silu_mul(const float *gu, bf16_t *g, int32_t n_rows, int32_t ffn, cudaStream_t stream);

// h[t] += sum_r weights[t][r] * sum_p y[p][perm_row[t*k + r]] (ranks and parts summed in order);
// y holds n_parts partial results, part p at y + p * part_stride (floats), rows of width d.
void moe_unpermute(const float *y, int32_t n_parts, int64_t part_stride, const int32_t *perm_row,
                   const float *weights, int32_t n_tokens, int32_t top_k, int32_t d, float *h, cudaStream_t stream);

// Small-batch experts as GEMVs driven by device-side routing (no host round trip); each expert's
// rows must number at most kMoeGemvMaxRows.
constexpr int32_t kMoeGemvMaxRows = 8;
constexpr int32_t kMoeDownSplits = 32;
// max_active bounds the number of active experts (grid size), max_rows the rows of any one expert.
// g[row][j] = silu(xp[row] . W13[e][j]) * (xp[row] . W13[e][F + j]) for the rows of every active expert.
void moe_up_gemv(const bf16_t *xp, const bf16_t *w13, const int32_t *offsets, const int32_t *active,
                 int32_t max_active, int32_t max_rows, int32_t d, int32_t ffn, bf16_t *g, cudaStream_t stream);
// y[p][row] = sum_{j in split p} g[row][j] W2[e][j][:] for p < kMoeDownSplits (fp32 partials,
// part stride n_rows * d).
void moe_down_gemv(const bf16_t *g, const bf16_t *w2, const int32_t *offsets, const int32_t *active,
                   int32_t max_active, int32_t max_rows, int32_t n_rows, int32_t d, int32_t ffn, float *y,
                   cudaStream_t stream);

// Mid-batch experts as grouped tensor-core GEMMs driven by the same device-side routing (no host
// round trip, so capturable in a CUDA graph). Each block owns an (active expert, N tile) and walks
// that expert's rows, so the weights are read once while an expert has at most 256 rows.
// Shapes: d % 128 == 0, ffn % 64 == 0.
bool moe_grouped_supported(int32_t d, int32_t ffn);
// g[row][j] = bf16(silu(xp[row] . W13[e][j]) * (xp[row] . W13[e][F + j])); max_rows bounds any
// one expert's rows (at most the token count).
void moe_up_grouped(const bf16_t *xp, const bf16_t *w13, const int32_t *offsets, const int32_t *active,
                    int32_t max_active, int32_t max_rows, int32_t d, int32_t ffn, bf16_t *g, cudaStream_t stream);
// y[row] = g[row] . W2[e] (fp32 [rows][d], one part for moe_unpermute).
void moe_down_grouped(const bf16_t *g, const bf16_t *w2, const int32_t *offsets, const int32_t *active,
                      int32_t max_active, int32_t max_rows, int32_t d, int32_t ffn, float *y, cudaStream_t stream);
// g[row][j] = bf16(silu(gu[row][j]) * gu[row][F + j]) for bf16 gu [rows][2F]: the cuBLAS path's
// gate|up output from kMoeBf16GateUpRows rows (token x rank pairs) up.
constexpr int64_t kMoeBf16GateUpRows = 1024;
void silu_mul_bf16(const bf16_t *gu, bf16_t *g, int32_t n_rows, int32_t ffn, cudaStream_t stream);

// y[T][N] = beta * y + x[T][K] . W[N][K]^T for T <= kGemvMaxTokens (decode-sized GEMMs), streaming W
// once at close to the HBM bandwidth. gemv_supported says whether the shape qualifies.
constexpr int32_t kGemvMaxTokens = 8;
bool gemv_supported(int64_t T, int64_t K);
void gemv_xwt(const bf16_t *x, int32_t T, int32_t K, const bf16_t *w, int32_t N, float *y, float beta,
              cudaStream_t stream);

// Bandwidth probe for benchmarks: reads n bf16 values (n % 8 == 0, 16-byte aligned) once and
// writes one float per block to out[gridDim] so the reads cannot be elided. Returns the block count.
int32_t read_probe(const bf16_t *p, int64_t n, float *out, cudaStream_t stream);

// Deterministic pseudo-random bf16 fill: uniform in [mean - half_range, mean + half_range].
void fill_uniform(bf16_t *p, int64_t n, uint64_t seed, float mean, float half_range, cudaStream_t stream);

}  // namespace dbrx::cuda
