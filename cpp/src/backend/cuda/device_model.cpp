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
