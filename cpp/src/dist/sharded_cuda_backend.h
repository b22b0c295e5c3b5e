// The DBRX forward pass split over tp x ep GPU ranks (dist/shard_plan.h). One process drives all
// of its GPUs, one thread per rank, each rank a CudaBackend holding only its shard (uploaded
// straight from the mmapped checkpoint), its own KV pool for its KV heads, and CudaRankHooks that
// all-reduce the partial sums of out_proj and the MoE into the residual and all-gather the
// vocabulary slices of the logits. Across hosts, one such process per host, joined through the
// TCP rendezvous (NCCL only). Declared in every build; without CUDA the factories throw UNSUPPORTED.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dist/tcp_rendezvous.h"
#include "model/backend.h"

namespace dbrx::dist {

enum class CudaTransport {
    Nccl,  // NCCL on device buffers: one rank per GPU, any number of processes
    Host,  // device -> host -> device through a ThreadCommunicator: one process, ranks may share a GPU
};

struct ShardedCudaOptions {
    // This process's GPUs (CUDA ordinals), one rank each, in rank order: global rank
    // process * devices.size() + i. Must be distinct with NCCL; Host may repeat one GPU (tests).
    std::vector<int32_t> devices;
    CudaTransport transport = CudaTransport::Nccl;
    // Processes (NCCL only); unset fields come from the launcher's environment
    // (tcp_rendezvous.h). A single process needs no address.
    RendezvousConfig rendezvous;
    // Longest a rank waits at a collective (a long prefill on a peer must not look like a dead one).
    std::chrono::milliseconds timeout{std::chrono::minutes(5)};
    // Runs on each rank's thread before every layer's first all-reduce: fault injection in tests.
    std::function<void(int32_t rank, int32_t layer)> before_layer;
};

// What one rank holds and how long its collectives took (benchmarks).
struct CudaRankStats {
    int32_t rank = 0, device = 0;
    int64_t weight_bytes = 0, kv_bytes = 0, workspace_bytes = 0;
    double collective_ms = 0;  // since the last call, CUDA events around every collective
    int64_t collectives = 0;
    int64_t graph_replays = 0, graph_captures = 0;  // the rank's decode-step CUDA graphs, in all
};

class ShardedCudaBackend : public Backend {
public:
    virtual int32_t world_size() const = 0;
    // Fails this process's collectives (any thread, at any time): a step waiting on a peer process
    // that is gone throws ENGINE_DEAD with `reason` now rather than at the timeout (dist/step_leader.h).
    virtual void abort(const std::string &reason) noexcept = 0;
    // Collective timing puts CUDA events around every collective, so steps run without graphs meanwhile.
    virtual void set_collective_timing(bool on) = 0;
    // Decode steps as CUDA graphs (NCCL ranks; on unless DBRX_CUDA_GRAPHS=0): the same on every rank.
    virtual void set_cuda_graphs(bool on) = 0;
    // Per local rank; collective time accumulated since the previous call.
    virtual std::vector<CudaRankStats> rank_stats() = 0;
};

// tp x ep ranks over options.devices (and the other processes' GPUs). Throws
// DBRX_ERR_INVALID_ARGUMENT for a plan the model cannot take or devices that do not match it,
// DBRX_ERR_UNSUPPORTED without CUDA (or NCCL), without enough GPUs, or for a head split the CUDA
// attention cannot run (more ranks than query heads, or query heads of one KV head spread unevenly).
// progress(fraction, user) is called on this thread as the ranks' weights arrive. After any rank
// fails, forward throws DBRX_ERR_ENGINE_DEAD naming it, and so does every later call.
std::unique_ptr<ShardedCudaBackend> make_sharded_cuda_backend(const Checkpoint &ckpt, int32_t tp, int32_t ep,
                                                              const ShardedCudaOptions &options,
                                                              bool (*progress)(float, void *) = nullptr,
                                                              void *progress_user = nullptr);
// The same over a synthetic full-width model generated on the GPUs (`dbrx bench`): random weights,
// so the logits mean nothing, but the work and the traffic are the real model's.
std::unique_ptr<ShardedCudaBackend> make_synthetic_sharded_cuda_backend(const ModelConfig &config, int32_t tp,
                                                                        int32_t ep, const ShardedCudaOptions &options,
                                                                        uint64_t seed);

// What the C API calls for the CUDA device: the plain CUDA backend on devices[0] for one rank in
// one process, otherwise the sharded one over NCCL with options.tp and options.ep.
std::unique_ptr<Backend> make_parallel_cuda_backend(const Checkpoint &ckpt, const BackendOptions &options,
                                                    const std::vector<int32_t> &devices,
                                                    const RendezvousConfig &rendezvous,
                                                    bool (*progress)(float, void *), void *progress_user);

}  // namespace dbrx::dist
