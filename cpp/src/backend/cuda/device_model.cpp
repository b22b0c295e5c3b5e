#include "backend/cuda/device_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace {

std::vector<float> inv_freq_table(const ModelConfig &c) {
    // Same rounding as the CPU backend: double, then fp32.
    std::vector<float> f(c.head_dim / 2);
    for (int32_t i = 0; i < c.head_dim / 2; ++i)
        f[i] = static_cast<float>(1.0 / std::pow(c.rope_theta, 2.0 * i / c.head_dim));
    return f;
}

void upload_inv_freq(DeviceModel &m) {
    const auto f = inv_freq_table(m.config);
    m.inv_freq = DeviceBuffer(f.size() * sizeof(float), "RoPE table");
    DBRX_CUDA_CHECK(cudaMemcpy(m.inv_freq.get(), f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice));
}

// Host -> device copies through two pinned buffers: while one chunk is in flight the next is
// memcpy'd from the mmapped checkpoint into the other.
class Uploader {
public:
    Uploader(int64_t total, bool (*progress)(float, void *), void *user)
        : total_(total), progress_(progress), user_(user) {
        for (int i = 0; i < 2; ++i) {
            staging_[i].reserve(kChunk);
            DBRX_CUDA_CHECK(cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming));
        }
    }
    ~Uploader() {
        for (auto &e : done_) cudaEventDestroy(e);
    }
    Uploader(const Uploader &) = delete;
    Uploader &operator=(const Uploader &) = delete;

    void copy(void *dst, const void *src, int64_t bytes) {
        auto *d = static_cast<uint8_t *>(dst);
        const auto *s = static_cast<const uint8_t *>(src);
        while (bytes > 0) {
            const int64_t n = std::min<int64_t>(bytes, kChunk);
            DBRX_CUDA_CHECK(cudaEventSynchronize(done_[cur_]));  // this buffer's last copy is done
            std::memcpy(staging_[cur_].get(), s, n);
            DBRX_CUDA_CHECK(cudaMemcpyAsync(d, staging_[cur_].get(), n, cudaMemcpyHostToDevice, stream_.get()));
            DBRX_CUDA_CHECK(cudaEventRecord(done_[cur_], stream_.get()));
            cur_ ^= 1;
            d += n;
            s += n;
            bytes -= n;
            done_bytes_ += n;
            if (progress_ && !progress_(static_cast<float>(done_bytes_) / static_cast<float>(total_), user_))
                invalid_argument("model load cancelled by the progress callback");
        }
    }
    void finish() { DBRX_CUDA_CHECK(cudaStreamSynchronize(stream_.get())); }

private:
    static constexpr int64_t kChunk = 64 << 20;
    int64_t total_, done_bytes_ = 0;
    bool (*progress_)(float, void *);
    void *user_;
    Stream stream_;
    PinnedBuffer staging_[2];
    cudaEvent_t done_[2]{};
    int cur_ = 0;
};

DeviceBuffer alloc_bf16(int64_t n, int64_t &total, const char *what) {
    total += n * static_cast<int64_t>(sizeof(bf16_t));
    return DeviceBuffer(static_cast<size_t>(n) * sizeof(bf16_t), what);
}

}  // namespace

ModelConfig dbrx_config(int32_t layers) {
    ModelConfig c;
    c.d_model = 6144;
    c.n_heads = 48;
    c.n_kv_heads = 8;
    c.head_dim = 128;
    c.n_layers = layers;
    c.max_seq_len = 32768;
    c.vocab_size = 100352;
    c.clip_qkv = 8.0f;
    c.rope_theta = 500000.0;
    c.ffn_hidden = 10752;
    c.n_experts = 16;
    c.top_k = 4;
    c.moe_norm_p = 1.0;
    c.eos_ids = {100257, 100279};
    return c;
}

std::unique_ptr<DeviceModel> upload_model(const Checkpoint &ckpt, bool (*progress)(float, void *), void *user) {
    auto m = std::make_unique<DeviceModel>();
    m->config = ckpt.config();
    const ModelConfig &c = m->config;
    const int64_t d = c.d_model, V = c.vocab_size, E = c.n_experts, F = c.ffn_hidden;
    const ModelWeights &w = ckpt.weights();
    Uploader up(ckpt.weight_bytes(), progress, user);
    auto put = [&](DeviceBuffer &dst, const bf16_t *src, int64_t n, const char *what) {
        dst = alloc_bf16(n, m->bytes, what);
        up.copy(dst.get(), src, n * static_cast<int64_t>(sizeof(bf16_t)));
    };
    put(m->wte, w.wte, V * d, "wte");
    put(m->norm_f, w.norm_f, d, "norm_f");
    put(m->lm_head, w.lm_head, V * d, "lm_head");
    m->layers.resize(c.n_layers);
    for (int32_t l = 0; l < c.n_layers; ++l) {
        const LayerWeights &lw = w.layers[l];
        DeviceLayer &dl = m->layers[l];
        put(dl.norm_1, lw.norm_1, d, "norm_1");
        put(dl.wqkv, lw.wqkv, c.qkv_rows() * d, "Wqkv");
        put(dl.out_proj, lw.out_proj, d * d, "out_proj");
        put(dl.norm_2, lw.norm_2, d, "norm_2");
        put(dl.router, lw.router, E * d, "router");
        dl.w13 = alloc_bf16(E * 2 * F * d, m->bytes, "experts w1|v1");
        for (int64_t e = 0; e < E; ++e) {
            bf16_t *dst = dl.w13.as<bf16_t>() + e * 2 * F * d;
            up.copy(dst, lw.w1 + e * F * d, F * d * 2);
            up.copy(dst + F * d, lw.v1 + e * F * d, F * d * 2);
        }
        put(dl.w2, lw.w2, E * F * d, "experts w2");
    }
    up.finish();
    upload_inv_freq(*m);
    std::fprintf(stderr, "dbrx: CUDA weights: %.2f GiB of device memory in plain allocations\n",
                 static_cast<double>(m->bytes) / (1 << 30));
    return m;
}

ModelConfig rank_config(const ModelConfig &global, const dist::RankShard &shard) {
    ModelConfig c = global;
    c.n_heads = shard.q_heads.size();
    c.n_kv_heads = shard.kv_heads.size();
    c.ffn_hidden = shard.ffn.size();
    return c;
}

std::unique_ptr<DeviceModel> upload_model_shard(const Checkpoint &ckpt, const dist::ShardPlan &plan, int32_t rank,
                                                bool (*progress)(float, void *), void *user) {
    const dist::RankShard sh = plan.shard(rank);
    const ModelConfig &g = ckpt.config();
    auto m = std::make_unique<DeviceModel>();
    m->config = rank_config(g, sh);
    const int64_t d = g.d_model, hd = g.head_dim, V = g.vocab_size, F = g.ffn_hidden;
    const int64_t nq = sh.q_heads.size(), nkv = sh.kv_heads.size(), fs = sh.ffn.size(), f0 = sh.ffn.begin;
    const int64_t qkv_rows = (nq + 2 * nkv) * hd, cols = nq * hd, n_exp = sh.experts.size();
    const int64_t per_layer = 2 * d + qkv_rows * d + d * cols + int64_t{g.n_experts} * d + n_exp * 3 * fs * d;
    const int64_t total = 2 * (V * d + d + int64_t{sh.vocab.size()} * d + g.n_layers * per_layer);
    const ModelWeights &w = ckpt.weights();
    Uploader up(total, progress, user);
    auto put = [&](DeviceBuffer &dst, const bf16_t *src, int64_t n, const char *what) {
        dst = alloc_bf16(n, m->bytes, what);
        up.copy(dst.get(), src, n * static_cast<int64_t>(sizeof(bf16_t)));
    };
    put(m->wte, w.wte, V * d, "wte");
    put(m->norm_f, w.norm_f, d, "norm_f");
    put(m->lm_head, w.lm_head + int64_t{sh.vocab.begin} * d, int64_t{sh.vocab.size()} * d, "lm_head slice");
    m->layers.resize(g.n_layers);
    std::vector<bf16_t> packed(static_cast<size_t>(d * cols));
    for (int32_t l = 0; l < g.n_layers; ++l) {
        const LayerWeights &lw = w.layers[l];
        DeviceLayer &dl = m->layers[l];
        put(dl.norm_1, lw.norm_1, d, "norm_1");
        // Column-parallel Wqkv: the rank's q, k and v rows are three contiguous row ranges.
        dl.wqkv = alloc_bf16(std::max<int64_t>(1, qkv_rows * d), m->bytes, "Wqkv shard");
        bf16_t *q = dl.wqkv.as<bf16_t>();
        up.copy(q, lw.wqkv + sh.q_heads.begin * hd * d, nq * hd * d * 2);
        up.copy(q + nq * hd * d, lw.wqkv + (d + sh.kv_heads.begin * hd) * d, nkv * hd * d * 2);
        up.copy(q + (nq + nkv) * hd * d, lw.wqkv + (d + (g.n_kv_heads + sh.kv_heads.begin) * hd) * d,
                nkv * hd * d * 2);
        // Row-parallel out_proj: the rank's input columns, strided on disk, packed on the host.
        const int64_t col0 = int64_t{sh.q_heads.begin} * hd;
        for (int64_t o = 0; o < d; ++o) std::memcpy(packed.data() + o * cols, lw.out_proj + o * d + col0, cols * 2);
        put(dl.out_proj, packed.data(), std::max<int64_t>(1, d * cols), "out_proj shard");
        put(dl.norm_2, lw.norm_2, d, "norm_2");
        put(dl.router, lw.router, int64_t{g.n_experts} * d, "router");
        dl.w13 = alloc_bf16(n_exp * 2 * fs * d, m->bytes, "experts w1|v1 shard");
        dl.w2 = alloc_bf16(n_exp * fs * d, m->bytes, "experts w2 shard");
        for (int64_t i = 0; i < n_exp; ++i) {
            const int64_t rows = ((sh.experts.begin + i) * F + f0) * d;  // expert e's FFN rows [f0, f0 + fs)
            bf16_t *dst = dl.w13.as<bf16_t>() + i * 2 * fs * d;
            up.copy(dst, lw.w1 + rows, fs * d * 2);
            up.copy(dst + fs * d, lw.v1 + rows, fs * d * 2);
            up.copy(dl.w2.as<bf16_t>() + i * fs * d, lw.w2 + rows, fs * d * 2);
        }
    }
    up.finish();
    upload_inv_freq(*m);
    std::fprintf(stderr, "dbrx: CUDA rank %d of %s: %.2f GiB of weights\n", rank, plan.describe().c_str(),
                 static_cast<double>(m->bytes) / (1 << 30));
    return m;
}

std::unique_ptr<DeviceModel> synthetic_model_shard(const ModelConfig &g, const dist::ShardPlan &plan, int32_t rank,
                                                   uint64_t seed) {
    const dist::RankShard sh = plan.shard(rank);
    auto m = std::make_unique<DeviceModel>();
    m->config = rank_config(g, sh);
    const int64_t d = g.d_model, hd = g.head_dim, V = g.vocab_size;
    const int64_t nq = sh.q_heads.size(), nkv = sh.kv_heads.size(), fs = sh.ffn.size(), n_exp = sh.experts.size();
    // Replicated tensors take the same seeds on every rank (all ranks must route and normalise
    // alike); sharded ones a seed of their rank.
    uint64_t shared = seed * 1000003, own = (seed * 1000003 + static_cast<uint64_t>(rank) + 1) * 1000003;
    auto gen = [&](DeviceBuffer &dst, int64_t n, float mean, float half, uint64_t &tensor, const char *what) {
        dst = alloc_bf16(std::max<int64_t>(1, n), m->bytes, what);
        if (n > 0) fill_uniform(dst.as<bf16_t>(), n, ++tensor, mean, half, nullptr);
    };
    const float a_d = 1.f / std::sqrt(static_cast<float>(d)), a_f = 1.f / std::sqrt(static_cast<float>(g.ffn_hidden));
    gen(m->wte, V * d, 0.f, 1.f, shared, "wte");
    gen(m->norm_f, d, 1.f, 0.5f, shared, "norm_f");
    gen(m->lm_head, int64_t{sh.vocab.size()} * d, 0.f, a_d, own, "lm_head slice");
    m->layers.resize(g.n_layers);
    for (auto &dl : m->layers) {
        gen(dl.norm_1, d, 1.f, 0.5f, shared, "norm_1");
        gen(dl.wqkv, (nq + 2 * nkv) * hd * d, 0.f, a_d, own, "Wqkv shard");
        gen(dl.out_proj, d * nq * hd, 0.f, a_d, own, "out_proj shard");
        gen(dl.norm_2, d, 1.f, 0.5f, shared, "norm_2");
        gen(dl.router, int64_t{g.n_experts} * d, 0.f, 0.5f, shared, "router");
        gen(dl.w13, n_exp * 2 * fs * d, 0.f, a_d, own, "experts w1|v1 shard");
        gen(dl.w2, n_exp * fs * d, 0.f, a_f, own, "experts w2 shard");
    }
    DBRX_CUDA_CHECK(cudaDeviceSynchronize());
    upload_inv_freq(*m);
    return m;
}

std::unique_ptr<DeviceModel> synthetic_model(const ModelConfig &c, uint64_t seed) {
    auto m = std::make_unique<DeviceModel>();
    m->config = c;
    const int64_t d = c.d_model, V = c.vocab_size, E = c.n_experts, F = c.ffn_hidden;
    uint64_t tensor = seed * 1000003;
    auto gen = [&](DeviceBuffer &dst, int64_t n, float mean, float half, const char *what) {
        dst = alloc_bf16(n, m->bytes, what);
        fill_uniform(dst.as<bf16_t>(), n, ++tensor, mean, half, nullptr);
    };
    const float a_d = 1.f / std::sqrt(static_cast<float>(d)), a_f = 1.f / std::sqrt(static_cast<float>(F));
    gen(m->wte, V * d, 0.f, 1.f, "wte");
    gen(m->norm_f, d, 1.f, 0.5f, "norm_f");
    gen(m->lm_head, V * d, 0.f, a_d, "lm_head");
    m->layers.resize(c.n_layers);
    for (auto &dl : m->layers) {
        gen(dl.norm_1, d, 1.f, 0.5f, "norm_1");
        gen(dl.wqkv, c.qkv_rows() * d, 0.f, a_d, "Wqkv");
        gen(dl.out_proj, d * d, 0.f, a_d, "out_proj");
        gen(dl.norm_2, d, 1.f, 0.5f, "norm_2");
        gen(dl.router, E * d, 0.f, 0.5f, "router");
        gen(dl.w13, E * 2 * F * d, 0.f, a_d, "experts w1|v1");
        gen(dl.w2, E * F * d, 0.f, a_f, "experts w2");
    }
    DBRX_CUDA_CHECK(cudaDeviceSynchronize());
    upload_inv_freq(*m);
    return m;
}

}  // namespace dbrx::cuda
