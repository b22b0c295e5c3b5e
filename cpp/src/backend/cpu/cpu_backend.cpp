// The CPU backend: the DBRX forward pass in fp32 over the bf16 weights of the mmapped checkpoint.
// All tokens of a step (every sequence's prefill chunk or decode token) go through each weight
// matrix together, but every kernel computes each token's values on their own, so a sequence's
// logits never depend on the batch, the chunking, the physical blocks or the thread count.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "backend/cpu/cpu_kv_pool.h"
#include "backend/cpu/kernels.h"
#include "model/backend.h"
#include "model/validate.h"
#include "util/error.h"
#include "util/thread_pool.h"

namespace dbrx {
namespace {

using cpu::CpuKvPool;
using cpu::kCpuKvMemory;

class CpuBackend final : public Backend {
public:
    CpuBackend(const Checkpoint &ckpt, const BackendOptions &options)
        : cfg_(ckpt.config()), w_(ckpt.weights()), threads_(options.n_threads),
          inv_freq_(cpu::rope_inv_freq(ckpt.config().head_dim, ckpt.config().rope_theta)) {
        check_backend_config(cfg_, static_cast<int64_t>(w_.layers.size()), "CPU backend");
    }

    std::string name() const override { return "cpu"; }

    int64_t kv_bytes_per_block(int32_t block_size) const override {
        return int64_t{cfg_.n_layers} * 2 * block_size * cfg_.n_kv_heads * cfg_.head_dim * int64_t{sizeof(float)};
    }

    int64_t kv_memory_available() const override { return kCpuKvMemory; }

    std::unique_ptr<KvPool> create_kv_pool(int32_t n_blocks, int32_t block_size) override {
        return std::make_unique<CpuKvPool>(cfg_.n_layers, n_blocks, block_size, cfg_.n_kv_heads, cfg_.head_dim);
    }

    void forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) override;

private:
    struct TokenRef {
        int32_t seq;
        int32_t pos;
    };

    CpuKvPool &check_inputs(KvPool &pool, std::span<const SeqStep> batch, float *logits) const;
    void attention_layer(CpuKvPool &kv, int32_t layer, std::span<const SeqStep> batch, float *h);
    void moe_layer(int32_t layer, float *h);

    const ModelConfig cfg_;
    const ModelWeights &w_;
    ThreadPool threads_;
    const std::vector<float> inv_freq_;
    std::mutex mutex_;
    // Per-step state (guarded by mutex_).
    std::vector<TokenRef> tokens_;
    std::vector<float> cos_, sin_, x_, qkv_, attn_, proj_, router_logits_, route_w_;
    std::vector<int32_t> route_e_;
};

CpuKvPool &CpuBackend::check_inputs(KvPool &pool, std::span<const SeqStep> batch, float *logits) const {
    auto *kv = dynamic_cast<CpuKvPool *>(&pool);
    if (!kv) invalid_argument("CPU backend forward: the KV pool was not created by the CPU backend");
    if (kv->n_layers() != cfg_.n_layers || kv->n_kv_heads() != cfg_.n_kv_heads || kv->head_dim() != cfg_.head_dim)
        invalid_argument("CPU backend forward: the KV pool was created for another model");
    check_forward_steps(cfg_, batch, *kv, logits, "CPU backend");
    return *kv;
}

void CpuBackend::forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    CpuKvPool &kv = check_inputs(pool, batch, logits);
    const int64_t d = cfg_.d_model, half = cfg_.head_dim / 2;

    tokens_.clear();
    for (size_t s = 0; s < batch.size(); ++s)
        for (size_t i = 0; i < batch[s].tokens.size(); ++i)
            tokens_.push_back({static_cast<int32_t>(s), batch[s].pos0 + static_cast<int32_t>(i)});
    const int64_t n = static_cast<int64_t>(tokens_.size());
    if (n == 0) return;

    std::vector<float> h(n * d);
    int64_t t = 0;
    for (const SeqStep &st : batch)
        for (int32_t id : st.tokens) cpu::bf16_to_f32(w_.wte + int64_t{id} * d, h.data() + d * t++, d);
    cos_.resize(n * half);
    sin_.resize(n * half);
    for (t = 0; t < n; ++t) cpu::rope_cos_sin(tokens_[t].pos, inv_freq_, cos_.data() + t * half, sin_.data() + t * half);

    for (int32_t layer = 0; layer < cfg_.n_layers; ++layer) {
        attention_layer(kv, layer, batch, h.data());
        moe_layer(layer, h.data());
    }

    // Only the last token of sequences that want logits goes through the final norm and lm_head.
    std::vector<int64_t> rows;
    t = 0;
    for (const SeqStep &st : batch) {
        t += static_cast<int64_t>(st.tokens.size());
        if (st.want_logits) rows.push_back(t - 1);
    }
    if (rows.empty()) return;
    std::vector<float> last(rows.size() * d);
    for (size_t r = 0; r < rows.size(); ++r) std::copy_n(h.data() + rows[r] * d, d, last.data() + r * d);
    cpu::layernorm(last.data(), w_.norm_f, last.data(), static_cast<int64_t>(rows.size()), d, threads_);
    cpu::gemm_xwt(last.data(), static_cast<int64_t>(rows.size()), d, w_.lm_head, cfg_.vocab_size, logits, threads_);
}

void CpuBackend::attention_layer(CpuKvPool &kv, int32_t layer, std::span<const SeqStep> batch, float *h) {
    const LayerWeights &lw = w_.layers[layer];
    const int64_t n = static_cast<int64_t>(tokens_.size());
    const int64_t d = cfg_.d_model, hd = cfg_.head_dim, n_kv = cfg_.n_kv_heads, rows = cfg_.qkv_rows();
    const int64_t half = hd / 2, bs = kv.block_size();
    x_.resize(n * d);
    qkv_.resize(n * rows);
    attn_.resize(n * d);
    proj_.resize(n * d);

    cpu::layernorm(h, lw.norm_1, x_.data(), n, d, threads_);
    cpu::gemm_xwt(x_.data(), n, d, lw.wqkv, rows, qkv_.data(), threads_);
    if (cfg_.clip_qkv) cpu::clamp(qkv_.data(), n * rows, *cfg_.clip_qkv);
    threads_.parallel_for(n, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            float *q = qkv_.data() + t * rows;
            const float *c = cos_.data() + t * half, *s = sin_.data() + t * half;
            cpu::rope_apply(q, cfg_.n_heads, cfg_.head_dim, c, s);
            cpu::rope_apply(q + d, cfg_.n_kv_heads, cfg_.head_dim, c, s);
            const TokenRef &tok = tokens_[t];
            int32_t block = batch[tok.seq].blocks[tok.pos / bs];
            int64_t slot = (tok.pos % bs) * n_kv * hd;
            std::copy_n(q + d, n_kv * hd, kv.keys(layer, block) + slot);
            std::copy_n(q + d + n_kv * hd, n_kv * hd, kv.values(layer, block) + slot);
        }
    }, cpu::slice_grain(rows * 2));

    const cpu::PagedKv view = kv.layer_view(layer);
    const int32_t group = cfg_.n_heads / cfg_.n_kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    int32_t max_pos = 0;
    for (const TokenRef &tok : tokens_) max_pos = std::max(max_pos, tok.pos);
    threads_.parallel_for(n * cfg_.n_heads, [&](int64_t i0, int64_t i1) {
        std::vector<float> scores;
        for (int64_t i = i0; i < i1; ++i) {
            int64_t t = i / cfg_.n_heads;
            int32_t head = static_cast<int32_t>(i % cfg_.n_heads);
            const TokenRef &tok = tokens_[t];
            scores.resize(static_cast<size_t>(tok.pos) + 1);
            cpu::attend_one(qkv_.data() + t * rows + head * hd, tok.pos, view, batch[tok.seq].blocks, head / group,
                            scale, scores.data(), attn_.data() + t * d + head * hd);
        }
    }, cpu::slice_grain(2 * hd * (max_pos + 1)));
    cpu::gemm_xwt(attn_.data(), n, d, lw.out_proj, d, proj_.data(), threads_);
    for (int64_t i = 0; i < n * d; ++i) h[i] += proj_[i];
}

void CpuBackend::moe_layer(int32_t layer, float *h) {
    const LayerWeights &lw = w_.layers[layer];
    const int64_t n = static_cast<int64_t>(tokens_.size());
    const int64_t d = cfg_.d_model, e = cfg_.n_experts, k = cfg_.top_k;
    router_logits_.resize(n * e);
    route_e_.resize(n * k);
    route_w_.resize(n * k);
    cpu::layernorm(h, lw.norm_2, x_.data(), n, d, threads_);
    cpu::gemm_xwt(x_.data(), n, d, lw.router, e, router_logits_.data(), threads_);
    for (int64_t t = 0; t < n; ++t)
        cpu::route(router_logits_.data() + t * e, cfg_.n_experts, cfg_.top_k, cfg_.moe_norm_p,
                   route_e_.data() + t * k, route_w_.data() + t * k);
    cpu::moe_experts(x_.data(), n, cfg_.d_model, cfg_.ffn_hidden, cfg_.n_experts, cfg_.top_k, route_e_.data(),
                     route_w_.data(), lw.w1, lw.v1, lw.w2, h, threads_);
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Checkpoint &ckpt, const BackendOptions &options) {
    return std::make_unique<CpuBackend>(ckpt, options);
}

}  // namespace dbrx
