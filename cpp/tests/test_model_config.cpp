// config.json / generation_config.json parsing: the real DBRX layout, its optional and nullable
// fields, and the errors (each naming the file and the key).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "io/model_config.h"
#include "test_safetensors_writer.h"

namespace dbrx {
namespace {

using nlohmann::json;
using iotest::expect_error;

// dbrx-instruct's config.json as published (research/dbrx.md §1.1), junk keys included.
json instruct_config() {
    return json::parse(R"({
      "architectures": ["DbrxForCausalLM"],
      "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
      "auto_map": {"AutoConfig": "configuration_dbrx.DbrxConfig",
                   "AutoModelForCausalLM": "modeling_dbrx.DbrxForCausalLM"},
      "d_model": 6144, "emb_pdrop": 0.0,
      "ffn_config": {"ffn_hidden_size": 10752, "model_type": "", "moe_jitter_eps": 0,
                     "moe_loss_weight": 0.05, "moe_num_experts": 16, "moe_top_k": 4},
      "initializer_range": 0.02, "max_seq_len": 32768, "model_type": "dbrx", "n_heads": 48,
      "n_layers": 40, "output_router_logits": false, "resid_pdrop": 0.0, "router_aux_loss_coef": 0.05,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.38.2",
      "use_cache": true, "vocab_size": 100352})");
}

const char *kInstructGeneration = R"({"_from_model_config": true, "eos_token_id": [100257, 100279]})";

ModelConfig parse(const json &config, const std::string &generation = "") {
    return parse_model_config(config.dump(), generation, "ckpt");
}

void expect_bad(const json &config, const std::string &needle, dbrx_status status = DBRX_ERR_BAD_CHECKPOINT) {
    expect_error([&] { parse(config); }, status, needle);
}

TEST(ModelConfig, DbrxInstruct) {
    ModelConfig c = parse(instruct_config(), kInstructGeneration);
    EXPECT_EQ(c.d_model, 6144);
    EXPECT_EQ(c.n_heads, 48);
    EXPECT_EQ(c.n_kv_heads, 8);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.qkv_rows(), 8192);
    EXPECT_EQ(c.n_layers, 40);
    EXPECT_EQ(c.max_seq_len, 32768);
    EXPECT_EQ(c.vocab_size, 100352);
    ASSERT_TRUE(c.clip_qkv.has_value());
    EXPECT_FLOAT_EQ(*c.clip_qkv, 8.0f);
    EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
    EXPECT_EQ(c.ffn_hidden, 10752);
    EXPECT_EQ(c.n_experts, 16);
    EXPECT_EQ(c.top_k, 4);
    ASSERT_TRUE(c.moe_norm_p.has_value());  // absent means p = 1
    EXPECT_DOUBLE_EQ(*c.moe_norm_p, 1.0);
    EXPECT_EQ(c.eos_ids, (std::vector<int32_t>{100257, 100279}));
}

TEST(ModelConfig, NullableAndDefaultedFields) {
    json j = instruct_config();
    j["attn_config"]["clip_qkv"] = nullptr;
    j["ffn_config"]["moe_normalize_expert_weights"] = nullptr;
    j["attn_config"].erase("rope_theta");
    ModelConfig c = parse(j);
    EXPECT_FALSE(c.clip_qkv.has_value());
    EXPECT_FALSE(c.moe_norm_p.has_value());
    EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
    EXPECT_TRUE(c.eos_ids.empty());

    j["attn_config"].erase("clip_qkv");
    j["ffn_config"]["moe_normalize_expert_weights"] = 2;
    c = parse(j);
    EXPECT_FALSE(c.clip_qkv.has_value());
    ASSERT_TRUE(c.moe_norm_p.has_value());
    EXPECT_DOUBLE_EQ(*c.moe_norm_p, 2.0);
}

TEST(ModelConfig, JunkKeysIgnored) {
    json j = instruct_config();
    // As in mlx-community re-exports: junk inside the sub-configs must not override the top level.
    j["attn_config"]["tie_word_embeddings"] = true;
    j["ffn_config"]["id2label"] = {{"0", "LABEL_0"}};
    j["ffn_config"]["ffn_act_fn"] = {{"name", "silu"}};
    j["ffn_config"]["uniform_expert_assignment"] = false;
    j["num_key_value_heads"] = 8;
    EXPECT_EQ(parse(j).n_kv_heads, 8);
}

TEST(ModelConfig, EosTokenVariants) {
    const json j = instruct_config();
    EXPECT_EQ(parse(j, R"({"eos_token_id": 100257})").eos_ids, (std::vector<int32_t>{100257}));
    EXPECT_TRUE(parse(j, R"({"eos_token_id": null})").eos_ids.empty());
    EXPECT_TRUE(parse(j, R"({"pad_token_id": 5})").eos_ids.empty());
    EXPECT_TRUE(parse(j, R"({"eos_token_id": []})").eos_ids.empty());
    expect_error([&] { parse(j, R"({"eos_token_id": "</s>"})"); }, DBRX_ERR_BAD_CHECKPOINT,
                 "ckpt/generation_config.json: eos_token_id: must be an integer, a list of integers or null");
    expect_error([&] { parse(j, R"({"eos_token_id": [1, 2.5]})"); }, DBRX_ERR_BAD_CHECKPOINT, "eos_token_id: must hold token ids");
    expect_error([&] { parse(j, R"({"eos_token_id": 100352})"); }, DBRX_ERR_BAD_CHECKPOINT, "in [0, 100352), found 100352");
    expect_error([&] { parse(j, R"({"eos_token_id": -1})"); }, DBRX_ERR_BAD_CHECKPOINT, "found -1");
    expect_error([&] { parse(j, "[1]"); }, DBRX_ERR_BAD_CHECKPOINT, "generation_config.json: not a JSON object");
    expect_error([&] { parse(j, "{"); }, DBRX_ERR_BAD_CHECKPOINT, "generation_config.json: not valid JSON");
}

TEST(ModelConfig, MissingKeys) {
    for (const char *key : {"d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"}) {
        json j = instruct_config();
        j.erase(key);
        expect_bad(j, std::string("ckpt/config.json: ") + key + ": missing");
    }
    json j = instruct_config();
    j.erase("attn_config");
    expect_bad(j, "config.json: attn_config: missing");
    j = instruct_config();
    j["ffn_config"].erase("moe_top_k");
    expect_bad(j, "config.json: ffn_config.moe_top_k: missing");
    j = instruct_config();
    j["attn_config"].erase("kv_n_heads");
    expect_bad(j, "attn_config.kv_n_heads: missing");
    j = instruct_config();
    j["ffn_config"].erase("ffn_hidden_size");
    expect_bad(j, "ffn_config.ffn_hidden_size: missing");
}

TEST(ModelConfig, BadValues) {
    auto with = [](const json::json_pointer &ptr, json value) {
        json j = instruct_config();
        j[ptr] = std::move(value);
        return j;
    };
    expect_bad(with("/d_model"_json_pointer, "6144"), "d_model: must be an integer, found \"6144\"");
    expect_bad(with("/d_model"_json_pointer, 6144.5), "d_model: must be an integer");
    expect_bad(with("/n_heads"_json_pointer, 0), "n_heads: must be positive, found 0");
    expect_bad(with("/n_layers"_json_pointer, -3), "n_layers: must be positive, found -3");
    expect_bad(with("/vocab_size"_json_pointer, 4294967296LL), "vocab_size: value 4294967296 is too large");
    expect_bad(with("/d_model"_json_pointer, 6100), "d_model: 6100 is not divisible by n_heads 48");
    expect_bad(with("/attn_config/kv_n_heads"_json_pointer, 5), "attn_config.kv_n_heads: 5 does not divide n_heads 48");
    expect_bad(with("/ffn_config/moe_top_k"_json_pointer, 17), "ffn_config.moe_top_k: 17 exceeds moe_num_experts 16");
    expect_bad(with("/ffn_config/moe_top_k"_json_pointer, 0), "ffn_config.moe_top_k: must be positive");
    expect_bad(with("/attn_config/rope_theta"_json_pointer, 0), "attn_config.rope_theta: must be a positive finite number");
    expect_bad(with("/attn_config/rope_theta"_json_pointer, nullptr), "attn_config.rope_theta: must be a number");
    expect_bad(with("/attn_config/clip_qkv"_json_pointer, -8), "attn_config.clip_qkv: must be a positive finite number");
    expect_bad(with("/attn_config/clip_qkv"_json_pointer, "8"), "attn_config.clip_qkv: must be a number");
    expect_bad(with("/attn_config/clip_qkv"_json_pointer, 1e300), "clip_qkv: is too large for fp32");
    expect_bad(with("/ffn_config/moe_normalize_expert_weights"_json_pointer, 0), "moe_normalize_expert_weights: must be a positive");
    expect_bad(with("/ffn_config/moe_normalize_expert_weights"_json_pointer, true), "moe_normalize_expert_weights: must be a number");
    expect_bad(with("/attn_config"_json_pointer, json::array()), "attn_config: must be an object");
    expect_bad(with("/ffn_config/ffn_act_fn"_json_pointer, "silu"), "ffn_config.ffn_act_fn: must be an object");
    expect_bad(with("/ffn_config/ffn_act_fn"_json_pointer, {{"name", 1}}), "ffn_config.ffn_act_fn.name: must be a string");
    expect_bad(with("/tie_word_embeddings"_json_pointer, "no"), "tie_word_embeddings: must be a boolean");
    expect_bad(with("/ffn_config/ffn_hidden_size"_json_pointer, 2147483647), "moe_num_experts * ffn_hidden_size overflows int32");
}

TEST(ModelConfig, UnsupportedFeatures) {
    json j = instruct_config();
    j["tie_word_embeddings"] = true;
    expect_bad(j, "config.json: tie_word_embeddings: tied embeddings are not supported", DBRX_ERR_UNSUPPORTED);
    j = instruct_config();
    j["ffn_config"]["ffn_act_fn"] = {{"name", "gelu"}};
    expect_bad(j, "ffn_config.ffn_act_fn.name: activation \"gelu\" is not supported (only silu)", DBRX_ERR_UNSUPPORTED);
}

TEST(ModelConfig, MalformedJson) {
    expect_error([] { parse_model_config("{\"d_model\": 1, \"d_model\": 2}", "", "ckpt"); }, DBRX_ERR_BAD_CHECKPOINT,
                 "ckpt/config.json: duplicate key \"d_model\"");
    expect_error([] { parse_model_config("{", "", "ckpt"); }, DBRX_ERR_BAD_CHECKPOINT, "ckpt/config.json: not valid JSON");
    expect_error([] { parse_model_config("[]", "", "ckpt"); }, DBRX_ERR_BAD_CHECKPOINT, "ckpt/config.json: not a JSON object");
    expect_error([] { parse_model_config("{\"a\xfe\": 1}", "", "ckpt"); }, DBRX_ERR_BAD_CHECKPOINT, "not valid UTF-8");
}

TEST(ModelConfig, LoadFromDirectory) {
    iotest::TempDir dir;
    expect_error([&] { load_model_config(dir.str()); }, DBRX_ERR_IO, "config.json: cannot open");
    iotest::write_file(dir.file("config.json"), instruct_config().dump());
    EXPECT_TRUE(load_model_config(dir.str()).eos_ids.empty());  // generation_config.json is optional
    iotest::write_file(dir.file("generation_config.json"), kInstructGeneration);
    EXPECT_EQ(load_model_config(dir.str()).eos_ids.size(), 2u);
    iotest::write_file(dir.file("generation_config.json"), "");
    expect_error([&] { load_model_config(dir.str()); }, DBRX_ERR_BAD_CHECKPOINT, "generation_config.json: empty file");
}

}  // namespace
}  // namespace dbrx
