// One GPU rank of the sharded CUDA backend (dist/sharded_cuda_backend.h): the CudaRankHooks that
// turn a CudaBackend holding a shard into a rank, and the collectives it runs them with.
// CUDA builds only: include it from code guarded by DBRX_WITH_CUDA.
//
// Per layer a rank all-reduces two [T][d] fp32 partial sums (out_proj, MoE) in the residual
// stream itself, and per step all-gathers the last positions' logits of its vocabulary slice.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_model.h"
#include "backend/cuda/moe.h"
#include "dist/communicator.h"
#include "dist/cuda_rank_hooks.h"
#include "dist/shard_plan.h"

namespace dbrx::dist {

// Collectives over device buffers, ordered on the caller's stream, failing with ENGINE_DEAD like
// Communicator (whose abort() fails them all). Synchronous for the caller unless asynchronous():
// then they only enqueue, and finish_step() is where the rank waits (with the communicator's
// timeout, never a hang) and where the step's collective failures surface.
class RankReduce {
public:
    virtual ~RankReduce() = default;
    virtual bool asynchronous() const = 0;
    // Waits for everything the step enqueued on `stream`.
    virtual void finish_step(cudaStream_t stream) = 0;
    virtual void all_reduce_sum(float *device_data, int64_t n, cudaStream_t stream) = 0;
    // device_recv[r * n + i] = rank r's device_send[i].
    virtual void all_gather(const float *device_send, int64_t n, float *device_recv, cudaStream_t stream) = 0;
    virtual Communicator &communicator() = 0;
};

// Through host memory: device -> pinned host, comm's host collective, host -> device. Any
// Communicator (a ThreadCommunicator in practice), so several ranks may share one GPU: this proves
// the sharded CUDA math on a single GPU. comm must outlive the reducer.
std::unique_ptr<RankReduce> make_host_reduce(Communicator &comm);
// NCCL on the device buffers directly (comm must be a NcclCommunicator; its collectives are moved
// onto `stream`, the rank backend's). Throws DBRX_ERR_UNSUPPORTED in builds without NCCL.
std::unique_ptr<RankReduce> make_nccl_reduce(Communicator &comm, cudaStream_t stream);

// Milliseconds spent in collectives, measured with CUDA events around each of them.
struct CollectiveTime {
    double ms = 0;
    int64_t calls = 0;
};

class CudaRank final : public CudaRankHooks {
public:
    // model: the rank's shard (upload_model_shard), owned by the rank's CudaBackend; both, and
    // reduce, must outlive this object. before_layer (may be empty) runs at the start of every
    // layer's out_proj, before its all-reduce: fault injection in tests.
    CudaRank(const ModelConfig &global, const ShardPlan &plan, int32_t rank, const cuda::DeviceModel &model,
             RankReduce &reduce, std::function<void(int32_t rank, int32_t layer)> before_layer);
    ~CudaRank() override;
    CudaRank(const CudaRank &) = delete;
    CudaRank &operator=(const CudaRank &) = delete;

    void out_proj(int32_t layer, const bf16_t *attn, int32_t n_tokens, float *h, cublasHandle_t blas,
                  cudaStream_t stream) override;
    void moe(int32_t layer, const bf16_t *x, int32_t n_tokens, float *h, cublasHandle_t blas,
             cudaStream_t stream) override;
    void lm_head(const bf16_t *x, int32_t n_rows, float *logits, cublasHandle_t blas, cudaStream_t stream) override;
    // Asynchronous collectives, whole experts on every rank (expert parallelism reads expert
    // offsets back to the host), a capturable MoE path, and neither timing events nor fault injection.
    bool capturable(int32_t n_tokens) const override;

    const RankShard &shard() const { return shard_; }
    // Collective timing for benchmarks (off by default: the events cost a little).
    void set_timing(bool on) { timing_ = on; }
    // Time spent in collectives since the last call (synchronises the stream of the last step).
    CollectiveTime take_timing();

private:
    // The rank's partial sum is computed straight into the residual h: rank 0 adds it to h, the
    // others overwrite h with it, and the in-place all-reduce of h then yields h + sum of partials
    // on every rank, with no separate add and no partial buffer.
    bool adds_residual() const { return shard_.rank == 0; }
    void reduce_residual(float *h, int64_t n, cudaStream_t stream);
    void timed(cudaStream_t stream, const std::function<void()> &collective);
    void expert_parallel_moe(const cuda::DeviceLayer &L, const bf16_t *x, int32_t T, float *out, cublasHandle_t blas,
                             cudaStream_t stream);

    const ModelConfig global_;
    const ShardPlan plan_;
    const RankShard shard_;
    const cuda::DeviceModel &model_;
    RankReduce &reduce_;
    std::function<void(int32_t, int32_t)> before_layer_;
    cuda::Moe moe_;  // the whole-expert path (ep == 1): every expert held, FFN rows split
    bool timing_ = false;
    std::vector<cudaEvent_t> events_;  // start/end pairs of this step's collectives
    size_t used_events_ = 0;
    cudaStream_t last_stream_ = nullptr;

    cuda::DeviceBuffer gather_send_, gather_recv_;
    // Expert-parallel MoE buffers.
    cuda::MoeRouting route_;
    cuda::DeviceBuffer xp_, gu_, g_, y_;
    cuda::PinnedBuffer host_offsets_;
};

}  // namespace dbrx::dist
