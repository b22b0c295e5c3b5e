// Checkpoint-level validation on a crafted 2-layer model: every tensor bound to the right name,
// and each way a stranger's checkpoint can be wrong rejected with a message naming the tensor.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>

#include "io/checkpoint.h"
#include "test_safetensors_writer.h"

namespace dbrx {
namespace {

using nlohmann::json;
using iotest::expect_error;
using iotest::make_safetensors;
using iotest::TempDir;
using iotest::TestTensor;

// d_model 4, 2 heads (head_dim 2), 1 kv head -> Wqkv rows 8; 2 experts of ffn 3 -> 6 expert rows.
const char *kConfig = R"({"d_model": 4, "n_heads": 2, "n_layers": 2, "max_seq_len": 16, "vocab_size": 8,
  "tie_word_embeddings": false,
  "attn_config": {"kv_n_heads": 1, "clip_qkv": null, "rope_theta": 10000},
  "ffn_config": {"ffn_hidden_size": 3, "moe_num_experts": 2, "moe_top_k": 1}})";

// Every tensor of the tiny model; each is filled with its own byte so binding can be checked.
std::vector<TestTensor> tiny_tensors() {
    std::vector<TestTensor> t = {{"transformer.wte.weight", {8, 4}},
                                 {"transformer.norm_f.weight", {4}},
                                 {"lm_head.weight", {8, 4}}};
    for (int i = 0; i < 2; ++i) {
        const std::string p = "transformer.blocks." + std::to_string(i) + ".";
        for (auto &&[name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
                 {"norm_attn_norm.norm_1.weight", {4}},
                 {"norm_attn_norm.attn.Wqkv.weight", {8, 4}},
                 {"norm_attn_norm.attn.out_proj.weight", {4, 4}},
                 {"norm_attn_norm.norm_2.weight", {4}},
                 {"ffn.router.layer.weight", {2, 4}},
                 {"ffn.experts.mlp.w1", {6, 4}},
                 {"ffn.experts.mlp.v1", {6, 4}},
                 {"ffn.experts.mlp.w2", {6, 4}}})
            t.push_back({p + name, shape});
    }
    for (size_t i = 0; i < t.size(); ++i) t[i].fill = static_cast<uint8_t>(i + 1);
    return t;
}

TestTensor &find(std::vector<TestTensor> &ts, const std::string &name) {
    return *std::find_if(ts.begin(), ts.end(), [&](const TestTensor &t) { return t.name == name; });
}

class CheckpointTest : public ::testing::Test {
protected:
    void SetUp() override { iotest::write_file(dir_.file("config.json"), kConfig); }

    void write_single(const std::vector<TestTensor> &ts) {
        iotest::write_file(dir_.file("model.safetensors"), make_safetensors(ts));
    }
    // Writes shard files a.safetensors, b.safetensors, ... and an index; `weight_map` overrides
    // the derived tensor -> shard map when given.
    void write_sharded(const std::vector<std::vector<TestTensor>> &shards, json weight_map = nullptr) {
        json derived = json::object();
        for (size_t s = 0; s < shards.size(); ++s) {
            const std::string name = std::string(1, static_cast<char>('a' + s)) + ".safetensors";
            iotest::write_file(dir_.file(name), make_safetensors(shards[s]));
            for (const auto &t : shards[s]) derived[t.name] = name;
        }
        json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map.is_null() ? derived : weight_map}};
        iotest::write_file(dir_.file("model.safetensors.index.json"), index.dump());
    }
    void expect_bad(const std::string &needle, dbrx_status status = DBRX_ERR_BAD_CHECKPOINT) {
        expect_error([&] { Checkpoint::open(dir_.str()); }, status, needle);
    }
    TempDir dir_;
};

void expect_bound_correctly(const Checkpoint &ck) {
    const auto ts = tiny_tensors();
    auto fill_of = [&](const std::string &name) {
        for (const auto &t : ts)
            if (t.name == name) return static_cast<bf16_t>(t.fill * 0x0101);
        return bf16_t{0};
    };
    const ModelWeights &w = ck.weights();
    EXPECT_EQ(w.wte[31], fill_of("transformer.wte.weight"));
    EXPECT_EQ(w.norm_f[3], fill_of("transformer.norm_f.weight"));
    EXPECT_EQ(w.lm_head[0], fill_of("lm_head.weight"));
    ASSERT_EQ(w.layers.size(), 2u);
    for (int i = 0; i < 2; ++i) {
        const std::string p = "transformer.blocks." + std::to_string(i) + ".";
        const LayerWeights &l = w.layers[i];
        EXPECT_EQ(l.norm_1[0], fill_of(p + "norm_attn_norm.norm_1.weight"));
        EXPECT_EQ(l.wqkv[31], fill_of(p + "norm_attn_norm.attn.Wqkv.weight"));
        EXPECT_EQ(l.out_proj[15], fill_of(p + "norm_attn_norm.attn.out_proj.weight"));
        EXPECT_EQ(l.norm_2[0], fill_of(p + "norm_attn_norm.norm_2.weight"));
        EXPECT_EQ(l.router[7], fill_of(p + "ffn.router.layer.weight"));
        EXPECT_EQ(l.w1[23], fill_of(p + "ffn.experts.mlp.w1"));
        EXPECT_EQ(l.v1[23], fill_of(p + "ffn.experts.mlp.v1"));
        EXPECT_EQ(l.w2[23], fill_of(p + "ffn.experts.mlp.w2"));
    }
    // 2 * (wte + lm_head + norm_f + 2 layers * (4 + 32 + 16 + 4 + 8 + 3 * 24)) bf16 values.
    EXPECT_EQ(ck.weight_bytes(), 2 * (32 + 32 + 4 + 2 * (4 + 32 + 16 + 4 + 8 + 72)));
}

TEST_F(CheckpointTest, SingleFileBindsEveryName) {
    write_single(tiny_tensors());
    auto ck = Checkpoint::open(dir_.str());
    EXPECT_EQ(ck->dir(), dir_.str());
    EXPECT_EQ(ck->config().qkv_rows(), 8);
    expect_bound_correctly(*ck);
}

TEST_F(CheckpointTest, ShardedBindsEveryName) {
    auto ts = tiny_tensors();
    write_sharded({{ts.begin(), ts.begin() + 7}, {ts.begin() + 7, ts.end()}});
    expect_bound_correctly(*Checkpoint::open(dir_.str()));
}

TEST_F(CheckpointTest, MissingTensor) {
    auto ts = tiny_tensors();
    ts.erase(ts.begin() + (&find(ts, "transformer.blocks.1.ffn.experts.mlp.v1") - ts.data()));
    write_single(ts);
    expect_bad("transformer.blocks.1.ffn.experts.mlp.v1: missing tensor (expected BF16 [6, 4])");
}

TEST_F(CheckpointTest, WrongShape) {
    auto ts = tiny_tensors();
    find(ts, "transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight").shape = {4, 8};
    write_single(ts);
    expect_bad("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight: shape is [4, 8], expected [8, 4]");
}

TEST_F(CheckpointTest, WrongRank) {
    auto ts = tiny_tensors();
    find(ts, "transformer.blocks.1.ffn.experts.mlp.w2").shape = {2, 3, 4};
    write_single(ts);
    expect_bad("transformer.blocks.1.ffn.experts.mlp.w2: shape is [2, 3, 4], expected [6, 4]");
}

TEST_F(CheckpointTest, WrongDtype) {
    auto ts = tiny_tensors();
    auto &norm = find(ts, "transformer.norm_f.weight");
    norm.dtype = "F32";
    write_single(ts);
    expect_bad("model.safetensors: transformer.norm_f.weight: dtype is F32, expected BF16");
    norm.dtype = "F16";
    write_single(ts);
    expect_bad("transformer.norm_f.weight: dtype is F16, expected BF16");
}

TEST_F(CheckpointTest, UnexpectedExtraTensor) {
    auto ts = tiny_tensors();
    ts.push_back({"transformer.blocks.2.norm_attn_norm.norm_1.weight", {4}});
    write_single(ts);
    expect_bad("transformer.blocks.2.norm_attn_norm.norm_1.weight: unexpected tensor");
}

TEST_F(CheckpointTest, MisalignedData) {
    // One extra space after the header makes its length odd, so every bf16 starts on an odd byte.
    std::string bytes = make_safetensors(tiny_tensors(), nullptr, /*pad=*/false);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
    if (n % 2 == 0) {
        bytes.insert(8 + n, " ");
        bytes[0] = static_cast<char>(bytes[0] + 1);  // n is small: no carry out of byte 0 when n is even
    }
    iotest::write_file(dir_.file("model.safetensors"), bytes);
    expect_bad("transformer.wte.weight: data is not 2-byte aligned");
}

TEST_F(CheckpointTest, ShardPathEscapesDirectory) {
    auto ts = tiny_tensors();
    json wm = json::object();
    for (const auto &t : ts) wm[t.name] = "a.safetensors";
    wm["lm_head.weight"] = "../a.safetensors";
    write_sharded({ts}, wm);
    expect_bad("lm_head.weight: shard \"../a.safetensors\" escapes the checkpoint directory");
    wm["lm_head.weight"] = "sub/../../a.safetensors";
    write_sharded({ts}, wm);
    expect_bad("escapes the checkpoint directory");
    wm["lm_head.weight"] = dir_.file("a.safetensors");
    write_sharded({ts}, wm);
    expect_bad("is an absolute path");
    wm["lm_head.weight"] = "";
    write_sharded({ts}, wm);
    expect_bad("is an empty file name");
}

TEST_F(CheckpointTest, DuplicateAcrossShards) {
    auto ts = tiny_tensors();
    std::vector<TestTensor> first(ts.begin(), ts.begin() + 7), second(ts.begin() + 6, ts.end());
    write_sharded({first, second});
    expect_bad(ts[6].name + ": also defined in");
}

TEST_F(CheckpointTest, IndexNamesWrongShard) {
    auto ts = tiny_tensors();
    json wm = json::object();
    for (size_t i = 0; i < ts.size(); ++i) wm[ts[i].name] = i < 7 ? "a.safetensors" : "b.safetensors";
    wm[ts[0].name] = "b.safetensors";
    write_sharded({{ts.begin(), ts.begin() + 7}, {ts.begin() + 7, ts.end()}}, wm);
    expect_bad("transformer.wte.weight: the index puts it in b.safetensors, which does not contain it");
}

TEST_F(CheckpointTest, TensorMissingFromIndex) {
    auto ts = tiny_tensors();
    json wm = json::object();
    for (const auto &t : ts) wm[t.name] = "a.safetensors";
    wm.erase("transformer.norm_f.weight");
    write_sharded({ts}, wm);
    expect_bad("transformer.norm_f.weight: tensor is not listed in model.safetensors.index.json");
}

TEST_F(CheckpointTest, IndexProblems) {
    auto ts = tiny_tensors();
    json wm = json::object();
    for (const auto &t : ts) wm[t.name] = "a.safetensors";
    wm["lm_head.weight"] = "c.safetensors";  // never written
    write_sharded({ts}, wm);
    expect_bad("c.safetensors: cannot open", DBRX_ERR_IO);

    iotest::write_file(dir_.file("model.safetensors.index.json"), R"({"metadata": {}})");
    expect_bad("model.safetensors.index.json: weight_map: missing or not an object");
    iotest::write_file(dir_.file("model.safetensors.index.json"), R"({"weight_map": {"lm_head.weight": 3}})");
    expect_bad("lm_head.weight: shard name must be a string");
    iotest::write_file(dir_.file("model.safetensors.index.json"), R"({"weight_map": {}})");
    expect_bad("weight_map: is empty");
}

TEST_F(CheckpointTest, NonFiniteNormOrRouter) {
    auto ts = tiny_tensors();
    find(ts, "transformer.blocks.1.norm_attn_norm.norm_2.weight").fill = 0xff;  // 0xffff: a NaN
    write_single(ts);
    expect_bad("transformer.blocks.1.norm_attn_norm.norm_2.weight: holds a non-finite value at element 0");
    ts = tiny_tensors();
    find(ts, "transformer.blocks.0.ffn.router.layer.weight").fill = 0x7f;  // 0x7f7f: finite, the largest exponent below Inf
    write_single(ts);
    EXPECT_NO_THROW(Checkpoint::open(dir_.str()));
}

TEST_F(CheckpointTest, NoWeightFiles) { expect_bad("no model.safetensors or model.safetensors.index.json", DBRX_ERR_IO); }

TEST_F(CheckpointTest, ConfigErrorsComeFirst) {
    write_single(tiny_tensors());
    json config = json::parse(kConfig);
    config["tie_word_embeddings"] = true;
    iotest::write_file(dir_.file("config.json"), config.dump());
    expect_bad("config.json: tie_word_embeddings: tied embeddings are not supported", DBRX_ERR_UNSUPPORTED);
}

}  // namespace
}  // namespace dbrx
