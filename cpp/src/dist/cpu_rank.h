// One rank of the sharded CPU forward pass: the weights its RankShard names (pointers into the
// mmapped checkpoint; only out_proj's columns, strided on disk, are packed into a buffer of its
// own), its KV heads, its thread pool, and the DBRX step over them with the collectives of a
// Communicator between the partial results. The same steps, on device buffers and NCCL, are
// what a GPU rank runs.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "backend/cpu/cpu_kv_pool.h"
#include "dist/communicator.h"
#include "dist/shard_plan.h"
#include "io/checkpoint.h"
#include "model/backend.h"
#include "util/thread_pool.h"

namespace dbrx::dist {

// A step's inputs, shared read-only by all ranks.
struct StepInput {
    struct TokenRef {
        int32_t seq;
        int32_t pos;
    };
    std::span<const SeqStep> batch;
    std::vector<TokenRef> tokens;      // every new token of the batch, in batch order
    std::vector<int64_t> logit_rows;   // indices into tokens of the last token of each want_logits step
};

class CpuRank {
public:
    // Throws DBRX_ERR_OUT_OF_MEMORY when the packed out_proj columns cannot be allocated.
    CpuRank(const ModelConfig &config, const ModelWeights &weights, const ShardPlan &plan, int32_t rank,
            int32_t n_threads);

    const RankShard &shard() const { return shard_; }

    // The rank's share of a step. kv holds this rank's KV heads (null when it holds none). Rank 0
    // writes the gathered [logit_rows x vocab] logits to `logits`; the others leave it alone.
    // `before_layer`, when set, runs at the start of every layer (fault injection and tracing).
    void forward(const StepInput &step, cpu::CpuKvPool *kv, Communicator &comm, float *logits,
                 const std::function<void(int32_t rank, int32_t layer)> &before_layer);

private:
    void attention(int32_t layer, const StepInput &step, cpu::CpuKvPool *kv, Communicator &comm);
    void moe(int32_t layer, Communicator &comm);
    void lm_head(const StepInput &step, Communicator &comm, float *logits);

    const ModelConfig &cfg_;
    const ModelWeights &w_;
    const ShardPlan plan_;
    const RankShard shard_;
    ThreadPool threads_;
    const std::vector<float> inv_freq_;
    // Per layer: out_proj columns of this rank's query heads, [d_model][q_heads * head_dim].
    std::vector<std::vector<bf16_t>> out_proj_cols_;

    // Per-step buffers, reused across steps.
    std::vector<float> h_, x_, partial_, q_, k_, v_, attn_, cos_, sin_;
    std::vector<float> router_logits_, route_w_, expert_out_, xs_, gate_, up_, y_;
    std::vector<int32_t> route_e_;
};

}  // namespace dbrx::dist
