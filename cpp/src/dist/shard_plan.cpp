#include "dist/shard_plan.h"

#include <algorithm>

#include "util/error.h"

namespace dbrx::dist {
namespace {

std::string num(int64_t v) { return std::to_string(v); }

}  // namespace

ShardPlan ShardPlan::make(const ModelConfig &c, int32_t tp, int32_t ep) {
    const std::string where = "shard plan (tp " + num(tp) + ", ep " + num(ep) + "): ";
    if (tp < 1 || ep < 1) invalid_argument(where + "tp and ep must be at least 1");
    if (int64_t{tp} * ep > kMaxWorldSize)
        invalid_argument(where + "tp * ep = " + num(int64_t{tp} * ep) + " exceeds " + num(kMaxWorldSize) + " ranks");
    if (c.n_heads <= 0 || c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0 || c.n_experts <= 0 ||
        c.ffn_hidden <= 0 || c.vocab_size <= 0)
        invalid_argument(where + "the model config has non-positive or inconsistent head/expert/ffn/vocab sizes");

    ShardPlan p;
    p.tp = tp;
    p.ep = ep;
    p.world_size = tp * ep;
    p.n_heads = c.n_heads;
    p.n_kv_heads = c.n_kv_heads;
    p.n_experts = c.n_experts;
    p.ffn_hidden = c.ffn_hidden;
    p.vocab_size = c.vocab_size;
    p.attention_ranks = std::min(p.world_size, c.n_heads);
    if (c.n_heads % p.attention_ranks != 0)
        invalid_argument(where + "n_heads " + num(c.n_heads) + " cannot be split evenly over tp * ep = " +
                         num(p.world_size) + " ranks (choose a divisor of n_heads, or a multiple of it)");
    if (c.n_experts % ep != 0)
        invalid_argument(where + "n_experts " + num(c.n_experts) + " is not divisible by ep " + num(ep));
    if (c.ffn_hidden % tp != 0)
        invalid_argument(where + "ffn_hidden_size " + num(c.ffn_hidden) + " is not divisible by tp " + num(tp));
    p.vocab_slice = static_cast<int32_t>((int64_t{c.vocab_size} + p.world_size - 1) / p.world_size);
    return p;
}

RankShard ShardPlan::shard(int32_t rank) const {
    if (rank < 0 || rank >= world_size)
        invalid_argument("shard plan: rank " + num(rank) + " outside [0, " + num(world_size) + ")");
    RankShard s;
    s.rank = rank;
    s.tp_rank = rank % tp;
    s.ep_rank = rank / tp;
    if (rank < attention_ranks) {
        const int32_t per = n_heads / attention_ranks, group = n_heads / n_kv_heads;
        s.q_heads = {rank * per, (rank + 1) * per};
        s.kv_heads = {s.q_heads.begin / group, (s.q_heads.end - 1) / group + 1};
    }
    const int32_t experts_per = n_experts / ep, ffn_per = ffn_hidden / tp;
    s.experts = {s.ep_rank * experts_per, (s.ep_rank + 1) * experts_per};
    s.ffn = {s.tp_rank * ffn_per, (s.tp_rank + 1) * ffn_per};
    const int64_t v0 = std::min<int64_t>(int64_t{rank} * vocab_slice, vocab_size);
    const int64_t v1 = std::min<int64_t>(v0 + vocab_slice, vocab_size);
    s.vocab = {static_cast<int32_t>(v0), static_cast<int32_t>(v1)};
    return s;
}

std::string ShardPlan::describe() const {
    return "tp " + num(tp) + " x ep " + num(ep) + " = " + num(world_size) + " ranks: " +
           num(n_heads / attention_ranks) + " query heads on each of " + num(attention_ranks) + " ranks, " +
           num(n_experts / ep) + " experts x " + num(ffn_hidden / tp) + " FFN rows per rank, " +
           num(vocab_slice) + " vocab rows per rank";
}

}  // namespace dbrx::dist
