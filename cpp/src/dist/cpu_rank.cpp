#include "dist/cpu_rank.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <string>

#include "backend/cpu/kernels.h"
#include "util/error.h"

namespace dbrx::dist {

CpuRank::CpuRank(const ModelConfig &config, const ModelWeights &weights, const ShardPlan &plan, int32_t rank,
                 int32_t n_threads)
    : cfg_(config), w_(weights), plan_(plan), shard_(plan.shard(rank)), threads_(n_threads),
      inv_freq_(cpu::rope_inv_freq(config.head_dim, config.rope_theta)) {
    // out_proj is [d_out, d_in] row-major; this rank's heads are a column block of it, strided on
    // disk, so it is the one weight copied out of the mmap (1 / attention_ranks of out_proj).
    const int64_t d = cfg_.d_model, width = int64_t{shard_.q_heads.size()} * cfg_.head_dim;
    const int64_t col0 = int64_t{shard_.q_heads.begin} * cfg_.head_dim;
    if (width == 0) return;
    try {
        out_proj_cols_.resize(w_.layers.size());
        for (size_t l = 0; l < w_.layers.size(); ++l) {
            out_proj_cols_[l].resize(static_cast<size_t>(d * width));
            for (int64_t o = 0; o < d; ++o)
                std::copy_n(w_.layers[l].out_proj + o * d + col0, width, out_proj_cols_[l].data() + o * width);
        }
    } catch (const std::bad_alloc &) {
        fail(DBRX_ERR_OUT_OF_MEMORY, "sharded CPU backend: rank " + std::to_string(rank) + " cannot allocate its " +
                                         std::to_string(d * width * 2 * cfg_.n_layers) + " bytes of out_proj columns");
    }
}

void CpuRank::forward(const StepInput &step, cpu::CpuKvPool *kv, Communicator &comm, float *logits,
                      const std::function<void(int32_t, int32_t)> &before_layer) {
    const int64_t n = static_cast<int64_t>(step.tokens.size()), d = cfg_.d_model, half = cfg_.head_dim / 2;
    h_.resize(n * d);
    int64_t t = 0;
    for (const SeqStep &st : step.batch)
        for (int32_t id : st.tokens) cpu::bf16_to_f32(w_.wte + int64_t{id} * d, h_.data() + d * t++, d);
    cos_.resize(n * half);
    sin_.resize(n * half);
    for (t = 0; t < n; ++t)
        cpu::rope_cos_sin(step.tokens[t].pos, inv_freq_, cos_.data() + t * half, sin_.data() + t * half);

    for (int32_t layer = 0; layer < cfg_.n_layers; ++layer) {
        if (before_layer) before_layer(shard_.rank, layer);
        attention(layer, step, kv, comm);
        moe(layer, comm);
    }
    lm_head(step, comm, logits);
}

void CpuRank::attention(int32_t layer, const StepInput &step, cpu::CpuKvPool *kv, Communicator &comm) {
    const LayerWeights &lw = w_.layers[layer];
    const int64_t n = static_cast<int64_t>(step.tokens.size());
    const int64_t d = cfg_.d_model, hd = cfg_.head_dim, half = hd / 2;
    const int64_t nq = shard_.q_heads.size(), nkv = shard_.kv_heads.size();
    x_.resize(n * d);
    partial_.assign(static_cast<size_t>(n * d), 0.0f);
    cpu::layernorm(h_.data(), lw.norm_1, x_.data(), n, d, threads_);
    if (nq > 0) {
        // Column-parallel Wqkv: this rank's rows of q, of k and of v (contiguous row ranges).
        q_.resize(n * nq * hd);
        k_.resize(n * nkv * hd);
        v_.resize(n * nkv * hd);
        attn_.resize(n * nq * hd);
        const int64_t kv_rows = int64_t{cfg_.n_kv_heads} * hd;
        cpu::gemm_xwt(x_.data(), n, d, lw.wqkv + shard_.q_heads.begin * hd * d, nq * hd, q_.data(), threads_);
        cpu::gemm_xwt(x_.data(), n, d, lw.wqkv + (d + shard_.kv_heads.begin * hd) * d, nkv * hd, k_.data(), threads_);
        cpu::gemm_xwt(x_.data(), n, d, lw.wqkv + (d + kv_rows + shard_.kv_heads.begin * hd) * d, nkv * hd, v_.data(),
                      threads_);
        if (cfg_.clip_qkv) {
            cpu::clamp(q_.data(), n * nq * hd, *cfg_.clip_qkv);
            cpu::clamp(k_.data(), n * nkv * hd, *cfg_.clip_qkv);
            cpu::clamp(v_.data(), n * nkv * hd, *cfg_.clip_qkv);
        }
        const int64_t bs = kv->block_size();
        threads_.parallel_for(n, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t) {
                const float *c = cos_.data() + t * half, *s = sin_.data() + t * half;
                cpu::rope_apply(q_.data() + t * nq * hd, static_cast<int32_t>(nq), cfg_.head_dim, c, s);
                cpu::rope_apply(k_.data() + t * nkv * hd, static_cast<int32_t>(nkv), cfg_.head_dim, c, s);
                const StepInput::TokenRef &tok = step.tokens[t];
                int32_t block = step.batch[tok.seq].blocks[tok.pos / bs];
                int64_t slot = (tok.pos % bs) * nkv * hd;
                std::copy_n(k_.data() + t * nkv * hd, nkv * hd, kv->keys(layer, block) + slot);
                std::copy_n(v_.data() + t * nkv * hd, nkv * hd, kv->values(layer, block) + slot);
            }
        });
        const cpu::PagedKv view = kv->layer_view(layer);
        const int32_t group = cfg_.n_heads / cfg_.n_kv_heads;
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        threads_.parallel_for(n * nq, [&](int64_t i0, int64_t i1) {
            std::vector<float> scores;
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t t = i / nq, local = i % nq;
                const int32_t head = shard_.q_heads.begin + static_cast<int32_t>(local);
                const StepInput::TokenRef &tok = step.tokens[t];
                scores.resize(static_cast<size_t>(tok.pos) + 1);
                cpu::attend_one(q_.data() + (t * nq + local) * hd, tok.pos, view, step.batch[tok.seq].blocks,
                                head / group - shard_.kv_heads.begin, scale, scores.data(),
                                attn_.data() + (t * nq + local) * hd);
            }
        });
        // Row-parallel out_proj: this rank's heads' share of every output, summed over ranks below.
        cpu::gemm_xwt(attn_.data(), n, nq * hd, out_proj_cols_[layer].data(), d, partial_.data(), threads_);
    }
    comm.all_reduce_sum(partial_.data(), n * d);
    for (int64_t i = 0; i < n * d; ++i) h_[i] += partial_[i];
}

void CpuRank::moe(int32_t layer, Communicator &comm) {
    const LayerWeights &lw = w_.layers[layer];
    const int64_t n = static_cast<int64_t>(h_.size()) / cfg_.d_model;
    const int64_t d = cfg_.d_model, e_all = cfg_.n_experts, k = cfg_.top_k;
    const int64_t f_all = cfg_.ffn_hidden, f0 = shard_.ffn.begin, fs = shard_.ffn.size();
    router_logits_.resize(n * e_all);
    route_e_.resize(n * k);
    route_w_.resize(n * k);
    cpu::layernorm(h_.data(), lw.norm_2, x_.data(), n, d, threads_);
    // The router is replicated: every rank routes every token identically (h is identical on all).
    cpu::gemm_xwt(x_.data(), n, d, lw.router, e_all, router_logits_.data(), threads_);
    for (int64_t t = 0; t < n; ++t)
        cpu::route(router_logits_.data() + t * e_all, cfg_.n_experts, cfg_.top_k, cfg_.moe_norm_p,
                   route_e_.data() + t * k, route_w_.data() + t * k);

    // slots[e - e0]: the (token * top_k + rank) entries routed to an expert this rank holds.
    std::vector<std::vector<int64_t>> slots(static_cast<size_t>(shard_.experts.size()));
    for (int64_t i = 0; i < n * k; ++i)
        if (shard_.experts.contains(route_e_[i])) slots[route_e_[i] - shard_.experts.begin].push_back(i);
    expert_out_.resize(n * k * d);
    for (int32_t e = shard_.experts.begin; e < shard_.experts.end; ++e) {
        const auto &sl = slots[e - shard_.experts.begin];
        if (sl.empty()) continue;
        const int64_t m = static_cast<int64_t>(sl.size());
        xs_.resize(m * d);
        gate_.resize(m * fs);
        up_.resize(m * fs);
        y_.resize(m * d);
        for (int64_t i = 0; i < m; ++i) std::copy_n(x_.data() + (sl[i] / k) * d, d, xs_.data() + i * d);
        // Rows [e * ffn + f0, e * ffn + f0 + fs) of w1, v1 and w2: this rank's FFN slice of expert e.
        const int64_t rows = (e * f_all + f0) * d;
        cpu::gemm_xwt(xs_.data(), m, d, lw.w1 + rows, fs, gate_.data(), threads_);
        cpu::gemm_xwt(xs_.data(), m, d, lw.v1 + rows, fs, up_.data(), threads_);
        cpu::silu_mul(gate_.data(), up_.data(), gate_.data(), m * fs);
        cpu::gemm_xw(gate_.data(), m, fs, lw.w2 + rows, d, y_.data(), threads_);
        for (int64_t i = 0; i < m; ++i) std::copy_n(y_.data() + i * d, d, expert_out_.data() + sl[i] * d);
    }
    partial_.resize(n * d);
    threads_.parallel_for(n, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
            for (int64_t c = 0; c < d; ++c) {
                float acc = 0;
                for (int64_t r = 0; r < k; ++r)
                    if (shard_.experts.contains(route_e_[t * k + r]))
                        acc += route_w_[t * k + r] * expert_out_[(t * k + r) * d + c];
                partial_[t * d + c] = acc;
            }
    });
    comm.all_reduce_sum(partial_.data(), n * d);
    for (int64_t i = 0; i < n * d; ++i) h_[i] += partial_[i];
}

void CpuRank::lm_head(const StepInput &step, Communicator &comm, float *logits) {
    const int64_t d = cfg_.d_model, rows = static_cast<int64_t>(step.logit_rows.size());
    if (rows == 0) return;  // all ranks see the same batch, so all skip the gather together
    std::vector<float> last(rows * d);
    for (int64_t r = 0; r < rows; ++r) std::copy_n(h_.data() + step.logit_rows[r] * d, d, last.data() + r * d);
    cpu::layernorm(last.data(), w_.norm_f, last.data(), rows, d, threads_);
    // Vocab-parallel lm_head: this rank's rows, padded to the common slice so the gather is uniform.
    const int64_t slice = plan_.vocab_slice, mine = shard_.vocab.size();
    std::vector<float> part(rows * mine), padded(rows * slice, 0.0f), all(rows * slice * plan_.world_size);
    cpu::gemm_xwt(last.data(), rows, d, w_.lm_head + int64_t{shard_.vocab.begin} * d, mine, part.data(), threads_);
    for (int64_t r = 0; r < rows; ++r) std::copy_n(part.data() + r * mine, mine, padded.data() + r * slice);
    comm.all_gather(padded.data(), rows * slice, all.data());
    if (shard_.rank != 0) return;
    const int64_t vocab = cfg_.vocab_size;
    for (int32_t p = 0; p < plan_.world_size; ++p) {
        const RankShard peer = plan_.shard(p);
        for (int64_t r = 0; r < rows; ++r)
            std::copy_n(all.data() + (p * rows + r) * slice, peer.vocab.size(), logits + r * vocab + peer.vocab.begin);
    }
}

}  // namespace dbrx::dist
