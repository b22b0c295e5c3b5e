// The sharding plan on the real DBRX shapes and on the tiny fixtures' shapes: every head, KV head,
// expert, FFN row and vocab row is owned as the plan promises, and impossible splits are refused.
#include <gtest/gtest.h>

#include <vector>

#include "dist/shard_plan.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

ModelConfig dbrx_config() {
    ModelConfig c;
    c.d_model = 6144;
    c.n_heads = 48;
    c.n_kv_heads = 8;
    c.head_dim = 128;
    c.n_layers = 40;
    c.max_seq_len = 32768;
    c.vocab_size = 100352;
    c.ffn_hidden = 10752;
    c.n_experts = 16;
    c.top_k = 4;
    return c;
}

ModelConfig tiny_config() {
    ModelConfig c = dbrx_config();
    c.d_model = 256;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.ffn_hidden = 192;
    c.n_experts = 4;
    c.top_k = 2;
    c.vocab_size = 512;
    return c;
}

// Checks the invariants every plan must hold, whatever (tp, ep).
void check_plan(const ModelConfig &c, const ShardPlan &p) {
    SCOPED_TRACE(p.describe());
    ASSERT_EQ(p.world_size, p.tp * p.ep);
    const int32_t group = c.n_heads / c.n_kv_heads;
    std::vector<int> q_owner(c.n_heads, 0), vocab_owner(c.vocab_size, 0);
    // (expert, ffn row) pairs: each must be held by exactly one rank.
    std::vector<int> expert_rows(static_cast<size_t>(c.n_experts) * c.ffn_hidden, 0);
    for (int32_t r = 0; r < p.world_size; ++r) {
        RankShard s = p.shard(r);
        EXPECT_EQ(s.rank, r);
        EXPECT_EQ(s.ep_rank * p.tp + s.tp_rank, r);
        for (int32_t h = s.q_heads.begin; h < s.q_heads.end; ++h) {
            q_owner[h]++;
            EXPECT_TRUE(s.kv_heads.contains(h / group)) << "rank " << r << " head " << h;
        }
        if (s.q_heads.empty()) {
            EXPECT_TRUE(s.kv_heads.empty());
        } else {
            // No KV head held that none of the rank's query heads reads.
            EXPECT_EQ(s.kv_heads.begin, s.q_heads.begin / group);
            EXPECT_EQ(s.kv_heads.end - 1, (s.q_heads.end - 1) / group);
        }
        EXPECT_EQ(s.experts.size(), c.n_experts / p.ep);
        EXPECT_EQ(s.ffn.size(), c.ffn_hidden / p.tp);
        for (int32_t e = s.experts.begin; e < s.experts.end; ++e)
            for (int32_t f = s.ffn.begin; f < s.ffn.end; ++f) expert_rows[static_cast<size_t>(e) * c.ffn_hidden + f]++;
        EXPECT_LE(s.vocab.size(), p.vocab_slice);
        for (int32_t v = s.vocab.begin; v < s.vocab.end; ++v) vocab_owner[v]++;
    }
    for (int32_t h = 0; h < c.n_heads; ++h) EXPECT_EQ(q_owner[h], 1) << "query head " << h;
    for (size_t i = 0; i < expert_rows.size(); ++i) ASSERT_EQ(expert_rows[i], 1) << "expert row " << i;
    for (int32_t v = 0; v < c.vocab_size; ++v) ASSERT_EQ(vocab_owner[v], 1) << "vocab row " << v;
}

TEST(DistPlan, DbrxTensorParallel) {
    const ModelConfig c = dbrx_config();
    for (int32_t tp : {1, 2, 4, 8, 16}) {
        ShardPlan p = ShardPlan::make(c, tp, 1);
        check_plan(c, p);
        EXPECT_EQ(p.attention_ranks, tp);
        RankShard s = p.shard(tp - 1);
        EXPECT_EQ(s.q_heads.size(), 48 / tp);
        EXPECT_EQ(s.ffn, (Range{10752 - 10752 / tp, 10752}));
        EXPECT_EQ(s.experts, (Range{0, 16}));
        EXPECT_EQ(p.vocab_slice, 100352 / tp);
    }
    // tp 16 > 8 KV heads: 3 query heads and 1 KV head per rank, each KV head on two ranks.
    ShardPlan p16 = ShardPlan::make(c, 16, 1);
    for (int32_t r = 0; r < 16; ++r) {
        EXPECT_EQ(p16.shard(r).kv_heads, (Range{r / 2, r / 2 + 1})) << "rank " << r;
        EXPECT_EQ(p16.shard(r).q_heads, (Range{3 * r, 3 * r + 3}));
    }
    // tp 4: 12 query heads, 2 KV heads per rank, none replicated.
    EXPECT_EQ(ShardPlan::make(c, 4, 1).shard(1).kv_heads, (Range{2, 4}));
}

TEST(DistPlan, DbrxExpertParallelAndHybrid) {
    const ModelConfig c = dbrx_config();
    for (int32_t ep : {2, 4, 8, 16}) {
        ShardPlan p = ShardPlan::make(c, 1, ep);
        check_plan(c, p);
        RankShard s = p.shard(1);
        EXPECT_EQ(s.experts, (Range{16 / ep, 2 * (16 / ep)}));
        EXPECT_EQ(s.ffn, (Range{0, 10752}));
        EXPECT_EQ(s.q_heads.size(), 48 / ep);
    }
    // 2 ep groups of 4 tp ranks: rank 5 = ep group 1, tp rank 1.
    ShardPlan p = ShardPlan::make(c, 4, 2);
    check_plan(c, p);
    RankShard s = p.shard(5);
    EXPECT_EQ(s.ep_rank, 1);
    EXPECT_EQ(s.tp_rank, 1);
    EXPECT_EQ(s.experts, (Range{8, 16}));
    EXPECT_EQ(s.ffn, (Range{2688, 5376}));
    EXPECT_EQ(s.q_heads, (Range{30, 36}));
}

TEST(DistPlan, TinyModelMoreRanksThanHeads) {
    const ModelConfig c = tiny_config();
    for (auto [tp, ep] : {std::pair{2, 1}, {4, 1}, {1, 2}, {1, 4}, {2, 2}}) {
        ShardPlan p = ShardPlan::make(c, tp, ep);
        check_plan(c, p);
        EXPECT_EQ(p.attention_ranks, std::min(2, tp * ep));
    }
    // tp 4 over 2 query heads: ranks 0 and 1 hold one head each (sharing the one KV head), 2 and 3 none.
    ShardPlan p = ShardPlan::make(c, 4, 1);
    EXPECT_EQ(p.shard(0).q_heads, (Range{0, 1}));
    EXPECT_EQ(p.shard(1).q_heads, (Range{1, 2}));
    EXPECT_EQ(p.shard(1).kv_heads, (Range{0, 1}));
    EXPECT_TRUE(p.shard(2).q_heads.empty());
    EXPECT_TRUE(p.shard(3).kv_heads.empty());
    EXPECT_EQ(p.shard(3).ffn, (Range{144, 192}));
}

TEST(DistPlan, UnevenVocabIsPadded) {
    ModelConfig c = tiny_config();
    c.vocab_size = 510;
    ShardPlan p = ShardPlan::make(c, 4, 1);
    check_plan(c, p);
    EXPECT_EQ(p.vocab_slice, 128);
    EXPECT_EQ(p.shard(3).vocab, (Range{384, 510}));
}

void expect_invalid(const ModelConfig &c, int32_t tp, int32_t ep, const std::string &needle) {
    try {
        ShardPlan::make(c, tp, ep);
        ADD_FAILURE() << "tp " << tp << " ep " << ep << " was accepted";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

TEST(DistPlan, RejectsImpossibleSplits) {
    const ModelConfig c = dbrx_config();
    expect_invalid(c, 0, 1, "at least 1");
    expect_invalid(c, 2, -1, "at least 1");
    expect_invalid(c, 5, 1, "n_heads 48");
    expect_invalid(c, 32, 1, "n_heads 48");
    expect_invalid(c, 1, 3, "n_experts 16");
    expect_invalid(c, 1, 12, "n_experts 16");
    expect_invalid(c, 2048, 1, "exceeds");
    ModelConfig odd = c;
    odd.ffn_hidden = 10750;
    expect_invalid(odd, 4, 1, "ffn_hidden_size 10750");
    EXPECT_THROW(ShardPlan::make(c, 2, 2).shard(4), Error);
    // More ranks than heads is accepted: the extra ranks hold no attention.
    ShardPlan wide = ShardPlan::make(c, 64, 1);
    EXPECT_EQ(wide.attention_ranks, 48);
    EXPECT_TRUE(wide.shard(50).q_heads.empty());
}

}  // namespace
}  // namespace dbrx::dist
