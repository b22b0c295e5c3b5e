// Checkpoint::open on the shipped fixtures: one file and an index with two shards.
#include <gtest/gtest.h>

#include "io/checkpoint.h"
#include "util/error.h"

namespace dbrx {
namespace {

TEST(CheckpointFixture, TinyDbrxSingleFile) {
    auto ck = Checkpoint::open(DBRX_SOURCE_DIR "/fixtures/tiny-dbrx");
    const ModelConfig &c = ck->config();
    EXPECT_EQ(c.d_model, 256);
    EXPECT_EQ(c.n_heads, 2);
    EXPECT_EQ(c.n_kv_heads, 1);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.n_layers, 2);
    EXPECT_EQ(c.vocab_size, 512);
    EXPECT_EQ(c.n_experts, 4);
    EXPECT_EQ(c.top_k, 2);
    EXPECT_EQ(c.ffn_hidden, 192);
    ASSERT_TRUE(c.clip_qkv.has_value());
    EXPECT_FLOAT_EQ(*c.clip_qkv, 8.0f);
    EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
    ASSERT_TRUE(c.moe_norm_p.has_value());
    EXPECT_DOUBLE_EQ(*c.moe_norm_p, 1.0);
    EXPECT_TRUE(c.eos_ids.empty());

    const ModelWeights &w = ck->weights();
    ASSERT_EQ(w.layers.size(), 2u);
    EXPECT_NE(w.wte, nullptr);
    EXPECT_NE(w.lm_head, nullptr);
    EXPECT_NE(w.layers[1].w2, nullptr);
    // All tensors are weights: the data section is the whole file minus the header.
    const int64_t d = 256, v = 512, rows = 4 * 192, qkv = 256 + 2 * 128;
    const int64_t per_layer = 2 * d + qkv * d + d * d + 4 * d + 3 * rows * d;
    EXPECT_EQ(ck->weight_bytes(), 2 * (2 * v * d + d + 2 * per_layer));
}

TEST(CheckpointFixture, ShardedCl100k) {
    auto ck = Checkpoint::open(DBRX_SOURCE_DIR "/models/tiny-dbrx-cl100k");
    const ModelConfig &c = ck->config();
    EXPECT_EQ(c.d_model, 32);
    EXPECT_EQ(c.vocab_size, 100352);
    EXPECT_EQ(c.n_experts, 16);
    EXPECT_EQ(c.top_k, 4);
    EXPECT_EQ(ck->weights().layers.size(), 2u);
    // The index's metadata.total_size is the sum of all tensor bytes.
    EXPECT_EQ(ck->weight_bytes(), 13252928);
    EXPECT_FALSE(c.eos_ids.empty());
}

}  // namespace
}  // namespace dbrx
