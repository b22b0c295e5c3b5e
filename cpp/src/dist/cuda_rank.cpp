// CUDA builds only (the whole file): the rank hooks and the device-buffer collectives.
#ifdef DBRX_WITH_CUDA

#include "dist/cuda_rank.h"

#include <string>

#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "util/error.h"

#ifdef DBRX_WITH_NCCL
#include "dist/nccl_communicator.h"
#endif

namespace dbrx::dist {
namespace {

using cuda::DeviceBuffer;

class HostReduce final : public RankReduce {
public:
    explicit HostReduce(Communicator &comm) : comm_(comm) {}
    bool asynchronous() const override { return false; }
    void finish_step(cudaStream_t s) override { DBRX_CUDA_CHECK(cudaStreamSynchronize(s)); }
    void all_reduce_sum(float *data, int64_t n, cudaStream_t s) override {
        grow(send_, sizeof(float) * n, s);
        DBRX_CUDA_CHECK(cudaMemcpyAsync(send_.get(), data, sizeof(float) * n, cudaMemcpyDeviceToHost, s));
        DBRX_CUDA_CHECK(cudaStreamSynchronize(s));
        comm_.all_reduce_sum(send_.as<float>(), n);
        DBRX_CUDA_CHECK(cudaMemcpyAsync(data, send_.get(), sizeof(float) * n, cudaMemcpyHostToDevice, s));
    }
    void all_gather(const float *send, int64_t n, float *recv, cudaStream_t s) override {
        grow(send_, sizeof(float) * n, s);
        grow(recv_, sizeof(float) * n * comm_.size(), s);
        DBRX_CUDA_CHECK(cudaMemcpyAsync(send_.get(), send, sizeof(float) * n, cudaMemcpyDeviceToHost, s));
        DBRX_CUDA_CHECK(cudaStreamSynchronize(s));
        comm_.all_gather(send_.as<float>(), n, recv_.as<float>());
        DBRX_CUDA_CHECK(
            cudaMemcpyAsync(recv, recv_.get(), sizeof(float) * n * comm_.size(), cudaMemcpyHostToDevice, s));
    }
    Communicator &communicator() override { return comm_; }

private:
    // A larger buffer replaces one that the previous collective's host -> device copy may still read.
    static void grow(cuda::PinnedBuffer &b, size_t bytes, cudaStream_t s) {
        if (b.bytes() >= bytes) return;
        DBRX_CUDA_CHECK(cudaStreamSynchronize(s));
        b.reserve(bytes);
    }

    Communicator &comm_;
    // Reused by the next collective only after a stream synchronisation that follows this one's
    // host -> device copy, so the asynchronous copies never read a buffer being rewritten.
    cuda::PinnedBuffer send_, recv_;
};

#ifdef DBRX_WITH_NCCL
class NcclReduce final : public RankReduce {
public:
    NcclReduce(NcclCommunicator &comm, cudaStream_t stream) : comm_(comm) { comm_.set_stream(stream); }
    bool asynchronous() const override { return true; }
    // The collectives are on the backend's stream (set_stream), so that stream is the step's.
    void finish_step(cudaStream_t) override { comm_.finish_step(); }
    void all_reduce_sum(float *data, int64_t n, cudaStream_t) override { comm_.enqueue_all_reduce_sum(data, n); }
    void all_gather(const float *send, int64_t n, float *recv, cudaStream_t) override {
        comm_.enqueue_all_gather(send, n, recv);
    }
    Communicator &communicator() override { return comm_; }

private:
    NcclCommunicator &comm_;
};
#endif

cuda::MoeShape moe_shape(const ModelConfig &rank_cfg) {
    cuda::MoeShape s;
    s.d_model = rank_cfg.d_model;
    s.ffn = rank_cfg.ffn_hidden;  // the rank's FFN slice
    s.n_experts = rank_cfg.n_experts;
    s.top_k = rank_cfg.top_k;
    s.norm_p = rank_cfg.moe_norm_p ? static_cast<float>(*rank_cfg.moe_norm_p) : 0.f;
    return s;
}

}  // namespace

std::unique_ptr<RankReduce> make_host_reduce(Communicator &comm) { return std::make_unique<HostReduce>(comm); }

std::unique_ptr<RankReduce> make_nccl_reduce(Communicator &comm, cudaStream_t stream) {
#ifdef DBRX_WITH_NCCL
    auto *nccl = dynamic_cast<NcclCommunicator *>(&comm);
    if (!nccl) invalid_argument("make_nccl_reduce: the communicator is not a NcclCommunicator");
    return std::make_unique<NcclReduce>(*nccl, stream);
#else
    (void)comm;
    (void)stream;
    fail(DBRX_ERR_UNSUPPORTED, "this build has no NCCL (nccl.h / libnccl were not found): multi-GPU runs need it");
#endif
}

CudaRank::CudaRank(const ModelConfig &global, const ShardPlan &plan, int32_t rank, const cuda::DeviceModel &model,
                   RankReduce &reduce, std::function<void(int32_t, int32_t)> before_layer)
    : global_(global), plan_(plan), shard_(plan.shard(rank)), model_(model), reduce_(reduce),
      before_layer_(std::move(before_layer)), moe_(moe_shape(model.config)) {}

CudaRank::~CudaRank() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

void CudaRank::timed(cudaStream_t stream, const std::function<void()> &collective) {
    if (!timing_) return collective();
    while (events_.size() < used_events_ + 2) {
        cudaEvent_t e = nullptr;
        DBRX_CUDA_CHECK(cudaEventCreate(&e));
        events_.push_back(e);
    }
    DBRX_CUDA_CHECK(cudaEventRecord(events_[used_events_], stream));
    collective();
    DBRX_CUDA_CHECK(cudaEventRecord(events_[used_events_ + 1], stream));
    used_events_ += 2;
    last_stream_ = stream;
}

CollectiveTime CudaRank::take_timing() {
    CollectiveTime t;
    if (used_events_ == 0) return t;
    DBRX_CUDA_CHECK(cudaStreamSynchronize(last_stream_));
    for (size_t i = 0; i < used_events_; i += 2) {
        float ms = 0;
        DBRX_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]));
        t.ms += ms;
        ++t.calls;
    }
    used_events_ = 0;
    return t;
}

bool CudaRank::capturable(int32_t n_tokens) const {
    return reduce_.asynchronous() && !timing_ && !before_layer_ && shard_.experts.size() == global_.n_experts &&
           moe_.capturable(n_tokens);
}

void CudaRank::reduce_residual(float *h, int64_t n, cudaStream_t stream) {
    timed(stream, [&] { reduce_.all_reduce_sum(h, n, stream); });
}

void CudaRank::out_proj(int32_t layer, const bf16_t *attn, int32_t T, float *h, cublasHandle_t blas,
                        cudaStream_t stream) {
    if (before_layer_) before_layer_(shard_.rank, layer);
    const int64_t d = global_.d_model;
    // Row-parallel: this rank's heads' share of every output; the sum over ranks is out_proj(attn).
    cuda::gemm_xwt(blas, attn, T, int64_t{shard_.q_heads.size()} * global_.head_dim,
                   model_.layers[layer].out_proj.as<bf16_t>(), d, h, adds_residual() ? 1.f : 0.f);
    reduce_residual(h, int64_t{T} * d, stream);
}

void CudaRank::moe(int32_t layer, const bf16_t *x, int32_t T, float *h, cublasHandle_t blas, cudaStream_t stream) {
    const int64_t n = int64_t{T} * global_.d_model;
    // The MoE adds into its output: h itself on rank 0, a zeroed h elsewhere (x is its own copy).
    if (!adds_residual()) DBRX_CUDA_CHECK(cudaMemsetAsync(h, 0, sizeof(float) * n, stream));
    const cuda::DeviceLayer &L = model_.layers[layer];
    if (shard_.experts.size() == global_.n_experts) {
        cuda::MoeWeights mw;
        mw.router = L.router.as<bf16_t>();
        mw.w13 = L.w13.as<bf16_t>();
        mw.w2 = L.w2.as<bf16_t>();
        moe_.forward(x, T, mw, h, blas, stream);
    } else {
        expert_parallel_moe(L, x, T, h, blas, stream);
    }
    reduce_residual(h, n, stream);
}

// The rank's experts only: routing as everywhere, then the rows routed to experts [e0, e1), which
// the permutation makes one contiguous block [off[e0], off[e1]); the other rows of y stay zero, so
// the weighted un-permute adds nothing for experts held elsewhere.
void CudaRank::expert_parallel_moe(const cuda::DeviceLayer &L, const bf16_t *x, int32_t T, float *out,
                                   cublasHandle_t blas, cudaStream_t s) {
    const int32_t d = global_.d_model, E = global_.n_experts, k = global_.top_k, fs = shard_.ffn.size();
    const int32_t e0 = shard_.experts.begin, e1 = shard_.experts.end;
    const int64_t rows = int64_t{T} * k;
    const float norm_p = global_.moe_norm_p ? static_cast<float>(*global_.moe_norm_p) : 0.f;
    route_.reserve(T, E, k);
    y_.reserve(sizeof(float) * rows * d, "expert outputs");
    host_offsets_.reserve(sizeof(int32_t) * (E + 1));

    route_.route(x, T, d, L.router.as<bf16_t>(), E, k, norm_p, blas, s);
    DBRX_CUDA_CHECK(cudaMemcpyAsync(host_offsets_.get(), route_.offsets.get(), sizeof(int32_t) * (E + 1),
                                    cudaMemcpyDeviceToHost, s));
    DBRX_CUDA_CHECK(cudaMemsetAsync(y_.get(), 0, sizeof(float) * rows * d, s));
    DBRX_CUDA_CHECK(cudaStreamSynchronize(s));
    const int32_t *off = host_offsets_.as<int32_t>();
    const int32_t r0 = off[e0], r1 = off[e1], mine = r1 - r0;
    if (mine > 0) {
        xp_.reserve(sizeof(bf16_t) * mine * d, "permuted tokens");
        gu_.reserve(sizeof(float) * mine * 2 * int64_t{fs}, "expert gate/up");
        g_.reserve(sizeof(bf16_t) * mine * int64_t{fs}, "expert activations");
        cuda::gather_rows(x, route_.row_token.as<int32_t>() + r0, xp_.as<bf16_t>(), mine, d, s);
        for (int32_t e = e0; e < e1; ++e) {
            const int32_t m = off[e + 1] - off[e];
            if (m == 0) continue;
            const int64_t local = off[e] - r0;
            cuda::gemm_xwt(blas, xp_.as<bf16_t>() + local * d, m, d, L.w13.as<bf16_t>() + int64_t{e - e0} * 2 * fs * d,
                           2 * fs, gu_.as<float>() + local * 2 * fs);
        }
        cuda::silu_mul(gu_.as<float>(), g_.as<bf16_t>(), mine, fs, s);
        for (int32_t e = e0; e < e1; ++e) {
            const int32_t m = off[e + 1] - off[e];
            if (m == 0) continue;
            const int64_t local = off[e] - r0;
            cuda::gemm_xw(blas, g_.as<bf16_t>() + local * fs, m, fs, L.w2.as<bf16_t>() + int64_t{e - e0} * fs * d, d,
                          y_.as<float>() + int64_t{off[e]} * d);
        }
    }
    cuda::moe_unpermute(y_.as<float>(), 1, rows * d, route_.perm_row.as<int32_t>(), route_.weights.as<float>(), T, k,
                        d, out, s);
}

void CudaRank::lm_head(const bf16_t *x, int32_t n, float *logits, cublasHandle_t blas, cudaStream_t stream) {
    const int64_t slice = plan_.vocab_slice, mine = shard_.vocab.size(), V = global_.vocab_size;
    gather_send_.reserve(sizeof(float) * n * slice, "lm_head slice");
    gather_recv_.reserve(sizeof(float) * n * slice * plan_.world_size, "gathered logits");
    // Compact [n][mine] at the start of a [n * slice] payload, so that every rank sends as many floats.
    if (mine > 0)
        cuda::gemm_xwt(blas, x, n, global_.d_model, model_.lm_head.as<bf16_t>(), mine, gather_send_.as<float>());
    timed(stream, [&] { reduce_.all_gather(gather_send_.as<float>(), n * slice, gather_recv_.as<float>(), stream); });
    for (int32_t p = 0; p < plan_.world_size; ++p) {
        const Range v = plan_.shard(p).vocab;
        if (v.empty()) continue;
        DBRX_CUDA_CHECK(cudaMemcpy2DAsync(logits + v.begin, sizeof(float) * V,
                                          gather_recv_.as<float>() + int64_t{p} * n * slice, sizeof(float) * v.size(),
                                          sizeof(float) * v.size(), n, cudaMemcpyDeviceToDevice, stream));
    }
}

}  // namespace dbrx::dist

#endif  // DBRX_WITH_CUDA
