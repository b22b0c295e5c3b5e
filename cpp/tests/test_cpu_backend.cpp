// The CPU backend on generated checkpoints of unusual shapes (MHA, GQA, no clip, top-1, p-norms other
// than 1) against a double-precision forward pass written as plainly as possible, plus its input
// validation and KV pool sizing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/backend.h"
#include "test_safetensors_writer.h"
#include "util/error.h"

namespace dbrx {
namespace {

using iotest::expect_error;
using iotest::TempDir;
using iotest::write_file;

struct Shape {
    const char *name;
    int d, heads, kv_heads, layers, vocab, ffn, experts, top_k, max_seq;
    std::optional<double> clip, norm_p;
    double theta;
};

using Tensors = std::map<std::string, std::vector<double>>;  // bf16-exact values

// Writes config.json + model.safetensors with random bf16 weights; returns the weights as doubles.
Tensors write_checkpoint(const TempDir &dir, const Shape &s, uint32_t seed) {
    const int hd = s.d / s.heads;
    nlohmann::json cfg = {{"d_model", s.d}, {"n_heads", s.heads}, {"n_layers", s.layers},
                          {"max_seq_len", s.max_seq}, {"vocab_size", s.vocab},
                          {"attn_config", {{"kv_n_heads", s.kv_heads}, {"rope_theta", s.theta}}},
                          {"ffn_config", {{"ffn_hidden_size", s.ffn}, {"moe_num_experts", s.experts},
                                          {"moe_top_k", s.top_k}}}};
    cfg["attn_config"]["clip_qkv"] = s.clip ? nlohmann::json(*s.clip) : nlohmann::json(nullptr);
    cfg["ffn_config"]["moe_normalize_expert_weights"] = s.norm_p ? nlohmann::json(*s.norm_p) : nlohmann::json(nullptr);
    write_file(dir.file("config.json"), cfg.dump());

    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
        {"transformer.wte.weight", {s.vocab, s.d}}, {"transformer.norm_f.weight", {s.d}}, {"lm_head.weight", {s.vocab, s.d}}};
    for (int l = 0; l < s.layers; ++l) {
        std::string p = "transformer.blocks." + std::to_string(l) + ".";
        shapes.push_back({p + "norm_attn_norm.norm_1.weight", {s.d}});
        shapes.push_back({p + "norm_attn_norm.norm_2.weight", {s.d}});
        shapes.push_back({p + "norm_attn_norm.attn.Wqkv.weight", {s.d + 2 * s.kv_heads * hd, s.d}});
        shapes.push_back({p + "norm_attn_norm.attn.out_proj.weight", {s.d, s.d}});
        shapes.push_back({p + "ffn.router.layer.weight", {s.experts, s.d}});
        for (const char *m : {"w1", "v1", "w2"}) shapes.push_back({p + "ffn.experts.mlp." + m, {s.experts * s.ffn, s.d}});
    }
    std::mt19937 rng(seed);
    nlohmann::json header = nlohmann::json::object();
    std::string data;
    Tensors out;
    for (const auto &[name, shape] : shapes) {
        int64_t n = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
        bool norm = name.find("norm") != std::string::npos;
        bool wte = name.find("wte") != std::string::npos;
        std::normal_distribution<float> normal(0.0f, wte ? 1.0f : 0.25f);
        std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
        std::vector<double> &vals = out[name];
        header[name] = {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {data.size(), data.size() + 2 * n}}};
        for (int64_t i = 0; i < n; ++i) {
            bf16_t b = float_to_bf16(norm ? uniform(rng) : normal(rng));
            data.append(reinterpret_cast<const char *>(&b), 2);
            vals.push_back(bf16_to_float(b));
        }
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    write_file(dir.file("model.safetensors"), iotest::raw_safetensors(text, data));
    return out;
}

// The DBRX forward pass in double, last position only, transcribed from the reference semantics.
std::vector<double> reference_logits(const Shape &s, Tensors &w, const std::vector<int32_t> &ids) {
    const int d = s.d, H = s.heads, KV = s.kv_heads, hd = d / H, T = static_cast<int>(ids.size());
    auto ln = [&](std::vector<double> x, const std::vector<double> &g) {
        for (int t = 0; t < T; ++t) {
            double mu = 0, var = 0;
            for (int i = 0; i < d; ++i) mu += x[t * d + i] / d;
            for (int i = 0; i < d; ++i) var += (x[t * d + i] - mu) * (x[t * d + i] - mu) / d;
            for (int i = 0; i < d; ++i) x[t * d + i] = (x[t * d + i] - mu) / std::sqrt(var + 1e-5) * g[i];
        }
        return x;
    };
    auto linear = [&](const std::vector<double> &x, const std::vector<double> &W, int rows, int in, int row0 = 0) {
        std::vector<double> y(static_cast<size_t>(T) * rows, 0.0);
        for (int t = 0; t < T; ++t)
            for (int r = 0; r < rows; ++r)
                for (int i = 0; i < in; ++i) y[t * rows + r] += x[t * in + i] * W[(row0 + r) * static_cast<size_t>(in) + i];
        return y;
    };
    auto rope = [&](double *v, int pos) {
        for (int i = 0; i < hd / 2; ++i) {
            double a = pos / std::pow(s.theta, 2.0 * i / hd), x1 = v[i], x2 = v[i + hd / 2];
            v[i] = x1 * std::cos(a) - x2 * std::sin(a);
            v[i + hd / 2] = x2 * std::cos(a) + x1 * std::sin(a);
        }
    };
    std::vector<double> h(static_cast<size_t>(T) * d);
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < d; ++i) h[t * d + i] = w["transformer.wte.weight"][ids[t] * static_cast<size_t>(d) + i];
    const int R = d + 2 * KV * hd;
    for (int l = 0; l < s.layers; ++l) {
        std::string p = "transformer.blocks." + std::to_string(l) + ".";
        auto qkv = linear(ln(h, w[p + "norm_attn_norm.norm_1.weight"]), w[p + "norm_attn_norm.attn.Wqkv.weight"], R, d);
        if (s.clip) for (auto &v : qkv) v = std::clamp(v, -*s.clip, *s.clip);
        for (int t = 0; t < T; ++t)
            for (int j = 0; j < H + KV; ++j) rope(&qkv[t * R + j * hd], t);
        std::vector<double> o(static_cast<size_t>(T) * d, 0.0);
        for (int t = 0; t < T; ++t)
            for (int hh = 0; hh < H; ++hh) {
                int kvh = hh / (H / KV);
                std::vector<double> sc(t + 1);
                double m = -INFINITY, sum = 0;
                for (int j = 0; j <= t; ++j) {
                    double acc = 0;
                    for (int c = 0; c < hd; ++c) acc += qkv[t * R + hh * hd + c] * qkv[j * R + d + kvh * hd + c];
                    m = std::max(m, sc[j] = acc / std::sqrt(double(hd)));
                }
                for (auto &v : sc) sum += (v = std::exp(v - m));
                for (int j = 0; j <= t; ++j)
                    for (int c = 0; c < hd; ++c) o[t * d + hh * hd + c] += sc[j] / sum * qkv[j * R + d + KV * hd + kvh * hd + c];
            }
        auto proj = linear(o, w[p + "norm_attn_norm.attn.out_proj.weight"], d, d);
        for (size_t i = 0; i < h.size(); ++i) h[i] += proj[i];
        auto x = ln(h, w[p + "norm_attn_norm.norm_2.weight"]);
        auto lg = linear(x, w[p + "ffn.router.layer.weight"], s.experts, d);
        for (int t = 0; t < T; ++t) {
            std::vector<double> pr(s.experts);
            double m = *std::max_element(lg.begin() + t * s.experts, lg.begin() + (t + 1) * s.experts), sum = 0;
            for (int e = 0; e < s.experts; ++e) sum += (pr[e] = std::exp(lg[t * s.experts + e] - m));
            for (auto &v : pr) v /= sum;
            std::vector<int> order(s.experts);
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pr[a] > pr[b]; });
            double norm = 1;
            if (s.norm_p) {
                double acc = 0;
                for (int r = 0; r < s.top_k; ++r) acc += std::pow(pr[order[r]], *s.norm_p);
                norm = std::pow(acc, 1.0 / *s.norm_p);
            }
            for (int r = 0; r < s.top_k; ++r) {
                const int e = order[r];
                std::vector<double> g(s.ffn);
                for (int f = 0; f < s.ffn; ++f) {
                    double a = 0, b = 0;
                    for (int i = 0; i < d; ++i) {
                        a += x[t * d + i] * w[p + "ffn.experts.mlp.w1"][(e * s.ffn + f) * size_t(d) + i];
                        b += x[t * d + i] * w[p + "ffn.experts.mlp.v1"][(e * s.ffn + f) * size_t(d) + i];
                    }
                    g[f] = a / (1 + std::exp(-a)) * b;
                }
                for (int i = 0; i < d; ++i) {
                    double acc = 0;
                    for (int f = 0; f < s.ffn; ++f) acc += g[f] * w[p + "ffn.experts.mlp.w2"][(e * s.ffn + f) * size_t(d) + i];
                    h[t * d + i] += pr[e] / norm * acc;
                }
            }
        }
    }
    auto hf = ln(h, w["transformer.norm_f.weight"]);
    std::vector<double> last(hf.end() - d, hf.end());
    std::vector<double> logits(s.vocab, 0.0);
    for (int v = 0; v < s.vocab; ++v)
        for (int i = 0; i < d; ++i) logits[v] += last[i] * w["lm_head.weight"][v * size_t(d) + i];
    return logits;
}

class CpuBackendShapes : public ::testing::TestWithParam<Shape> {};

TEST_P(CpuBackendShapes, MatchesDoubleForwardWithChunksAndScatteredBlocks) {
    const Shape s = GetParam();
    TempDir dir;
    Tensors w = write_checkpoint(dir, s, 7);
    auto ckpt = Checkpoint::open(dir.str());
    BackendOptions opts;
    opts.n_threads = 3;
    auto backend = make_cpu_backend(*ckpt, opts);
    const int32_t bs = 4, len = 19;
    std::vector<int32_t> ids(len);
    std::mt19937 rng(3);
    for (auto &t : ids) t = static_cast<int32_t>(rng() % s.vocab);
    auto pool = backend->create_kv_pool(12, bs);
    const std::vector<int32_t> blocks = {9, 2, 11, 0, 5};
    std::vector<float> logits(s.vocab);
    double worst = 0;
    for (int32_t pos = 0; pos < len; pos += 5) {  // chunks of 5, logits after each chunk
        const int32_t n = std::min(5, len - pos);
        std::vector<int32_t> chunk(ids.begin() + pos, ids.begin() + pos + n);
        SeqStep step{chunk, pos, blocks, true};
        backend->forward(*pool, std::span<const SeqStep>(&step, 1), logits.data());
        auto ref = reference_logits(s, w, std::vector<int32_t>(ids.begin(), ids.begin() + pos + n));
        double diff = 0;
        for (int v = 0; v < s.vocab; ++v) diff = std::max(diff, std::fabs(logits[v] - ref[v]));
        EXPECT_LE(diff, 1e-3) << "after " << pos + n << " tokens";
        worst = std::max(worst, diff);
    }
    std::printf("[ %s ] max |logit - double| %.3g\n", s.name, worst);
}

INSTANTIATE_TEST_SUITE_P(
    Configs, CpuBackendShapes,
    ::testing::Values(
        // MHA, no clip, top-1, no normalisation, a head_dim that is not a multiple of the SIMD width.
        Shape{"MhaNoClipTop1", 24, 4, 4, 2, 37, 10, 3, 1, 64, std::nullopt, std::nullopt, 10000.0},
        // GQA 2:1 with an active clamp, top-3 of 5 with an L2 norm.
        Shape{"Gqa2ClampTop3L2", 40, 4, 2, 3, 50, 12, 5, 3, 64, 0.5, 2.0, 500000.0},
        // One KV head for eight query heads, every expert chosen, p = 0.5.
        Shape{"OneKvHeadAllExpertsHalfNorm", 64, 8, 1, 1, 29, 8, 4, 4, 32, 3.0, 0.5, 1e6}),
    [](const auto &info) { return std::string(info.param.name); });

class CpuBackendChecks : public ::testing::Test {
protected:
    void SetUp() override {
        ckpt_ = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx");
        backend_ = make_cpu_backend(*ckpt_, BackendOptions{});
    }
    std::unique_ptr<Checkpoint> ckpt_;
    std::unique_ptr<Backend> backend_;
};

TEST_F(CpuBackendChecks, KvSizing) {
    const ModelConfig &c = ckpt_->config();
    EXPECT_EQ(backend_->name(), "cpu");
    EXPECT_EQ(backend_->kv_bytes_per_block(16), int64_t{c.n_layers} * 2 * 16 * c.n_kv_heads * c.head_dim * 4);
    EXPECT_EQ(backend_->kv_memory_available(), int64_t{2} << 30);
    auto pool = backend_->create_kv_pool(5, 16);
    EXPECT_EQ(pool->n_blocks(), 5);
    EXPECT_EQ(pool->block_size(), 16);
    expect_error([&] { backend_->create_kv_pool(0, 16); }, DBRX_ERR_INVALID_ARGUMENT, "n_blocks");
    // 2^31 blocks of 2^20 tokens would overflow; 2^22 blocks of 2^16 tokens (512 TiB) exceed any host.
    expect_error([&] { backend_->create_kv_pool(INT32_MAX, 1 << 20); }, DBRX_ERR_OUT_OF_MEMORY, "KV pool");
    expect_error([&] { backend_->create_kv_pool(1 << 22, 1 << 16); }, DBRX_ERR_OUT_OF_MEMORY, "KV pool");
}

TEST_F(CpuBackendChecks, RejectsInvalidSteps) {
    auto pool = backend_->create_kv_pool(4, 16);
    std::vector<float> logits(ckpt_->config().vocab_size);
    const std::vector<int32_t> ok_tokens = {1, 2, 3}, blocks = {0, 1};
    auto run = [&](std::vector<int32_t> tokens, int32_t pos0, std::vector<int32_t> table, float *out = nullptr) {
        SeqStep step{tokens, pos0, table, true};
        backend_->forward(*pool, std::span<const SeqStep>(&step, 1), out ? out : logits.data());
    };
    expect_error([&] { run({1, 512, 3}, 0, blocks); }, DBRX_ERR_INVALID_ARGUMENT, "token id 512");
    expect_error([&] { run({-1}, 0, blocks); }, DBRX_ERR_INVALID_ARGUMENT, "token id -1");
    expect_error([&] { run({}, 0, blocks); }, DBRX_ERR_INVALID_ARGUMENT, "no tokens");
    expect_error([&] { run(ok_tokens, 30, blocks); }, DBRX_ERR_INVALID_ARGUMENT, "cannot hold 33");
    expect_error([&] { run(ok_tokens, -2, blocks); }, DBRX_ERR_INVALID_ARGUMENT, "negative pos0");
    expect_error([&] { run(ok_tokens, 0, {4}); }, DBRX_ERR_INVALID_ARGUMENT, "block id 4");
    expect_error([&] { run(ok_tokens, 0, {-1}); }, DBRX_ERR_INVALID_ARGUMENT, "block id -1");
    std::vector<int32_t> many(70, 0);
    expect_error([&] { run(ok_tokens, 1022, many); }, DBRX_ERR_INVALID_ARGUMENT, "max_seq_len");
    SeqStep step{ok_tokens, 0, blocks, true};
    expect_error([&] { backend_->forward(*pool, std::span<const SeqStep>(&step, 1), nullptr); },
                          DBRX_ERR_INVALID_ARGUMENT, "logits");
    // A pool made for another model is refused.
    auto other_ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + "/models/tiny-dbrx-cl100k");
    auto other = make_cpu_backend(*other_ckpt, BackendOptions{});
    auto other_pool = other->create_kv_pool(4, 16);
    expect_error([&] { backend_->forward(*other_pool, std::span<const SeqStep>(&step, 1), logits.data()); },
                          DBRX_ERR_INVALID_ARGUMENT, "another model");
    // After the refusals the backend still works.
    run(ok_tokens, 0, blocks);
    for (float v : logits) ASSERT_TRUE(std::isfinite(v));
}

}  // namespace
}  // namespace dbrx
