// How the DBRX weights and work are split over tp x ep ranks. Pure functions of the model config
// and the user's (tp, ep) choice; the CPU thread ranks and the NCCL ranks use the same plan.
//
// The world has tp * ep ranks; rank r = ep_rank * tp + tp_rank.
//  - Attention is split by query heads over min(world, n_heads) ranks (attention ranks); each of
//    those holds the KV heads its query heads read, so KV heads are replicated when there are
//    more attention ranks than KV heads. Ranks beyond n_heads (only when world > n_heads) hold no
//    heads and add zeros to the out_proj all-reduce. Wqkv is split by rows (column-parallel:
//    the ranks' q, k and v rows), out_proj by its input columns (row-parallel) -> all-reduce.
//  - Experts: ep groups each hold n_experts / ep whole experts (expert-parallel); inside a group
//    the tp ranks each hold the slice [f0, f1) of the FFN dimension of every one of those experts
//    (tensor-parallel, as vLLM does for DBRX). ep = 1 is pure FFN split, tp = 1 pure EP. Every rank
//    adds its experts' partial outputs for all tokens routed to them -> all-reduce. Hidden states are
//    replicated after every all-reduce, so the expert dispatch needs no all-to-all.
//  - lm_head is split on the vocabulary in equal padded slices of ceil(vocab / world) rows; the
//    last position's logits are all-gathered.
//  - Embeddings, norms and the router are replicated (the router is tiny and every rank needs the
//    routing of every token; the embedding is read only at the rows of the step's tokens).
#pragma once

#include <cstdint>
#include <string>

#include "io/model_config.h"

namespace dbrx::dist {

// A half-open range [begin, end).
struct Range {
    int32_t begin = 0;
    int32_t end = 0;
    int32_t size() const { return end - begin; }
    bool empty() const { return end <= begin; }
    bool contains(int32_t i) const { return i >= begin && i < end; }
    bool operator==(const Range &) const = default;
};

// What one rank holds and computes.
struct RankShard {
    int32_t rank = 0;
    int32_t tp_rank = 0;
    int32_t ep_rank = 0;
    Range q_heads;   // query heads; empty on ranks beyond the attention ranks
    Range kv_heads;  // the KV heads q_heads read (query head h reads KV head h / (n_heads / n_kv_heads))
    Range experts;   // whole experts of this rank's ep group
    Range ffn;       // slice of the FFN dimension held of each of those experts
    Range vocab;     // lm_head rows; may be shorter than ShardPlan::vocab_slice on the last ranks
};

struct ShardPlan {
    int32_t tp = 1;
    int32_t ep = 1;
    int32_t world_size = 1;
    int32_t attention_ranks = 1;  // min(world_size, n_heads)
    int32_t vocab_slice = 0;      // padded rows per rank: ceil(vocab / world_size)

    // Throws dbrx::Error(DBRX_ERR_INVALID_ARGUMENT) naming why the model cannot be split so:
    // tp or ep < 1, n_heads not divisible by the attention ranks, n_experts by ep, ffn_hidden by tp.
    static ShardPlan make(const ModelConfig &config, int32_t tp, int32_t ep);

    RankShard shard(int32_t rank) const;
    std::string describe() const;  // one line, for logs and errors

    // Copied from the config so that shard() needs nothing else.
    int32_t n_heads = 0, n_kv_heads = 0, n_experts = 0, ffn_hidden = 0, vocab_size = 0;
};

// Largest world a plan accepts: beyond it the per-rank slices are degenerate for any DBRX-family model.
constexpr int32_t kMaxWorldSize = 1024;

}  // namespace dbrx::dist
