// The DBRX forward pass split over tp x ep ranks (dist/shard_plan.h) that are threads of this
// process, each holding only its shard of the weights and its KV heads, exchanging partial results
// through a ThreadCommunicator. It proves the sharded math on CPU, in CI, against the one-rank CPU
// backend; the NCCL backend runs the same plan with one GPU per rank.
//
// Process model (both backends): one process drives all local ranks, one thread per rank; across
// hosts, one such process per host, joined through the TCP rendezvous (dist/tcp_rendezvous.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>

#include "model/backend.h"

namespace dbrx::dist {

struct ShardedCpuOptions {
    // Longest a rank waits for the others at any collective before the step fails. Generous by
    // default: a rank legitimately computing a long prefill must not be mistaken for a dead one.
    std::chrono::milliseconds timeout{std::chrono::minutes(5)};
    // Runs on each rank's thread at the start of every layer: fault injection in tests, tracing.
    std::function<void(int32_t rank, int32_t layer)> before_layer;
};

// tp x ep ranks (options.tp and options.ep are ignored in favour of the arguments). Each rank
// gets max(1, n_threads / (tp * ep)) threads of its own. The checkpoint must outlive the backend.
// Throws DBRX_ERR_INVALID_ARGUMENT when the model cannot be split so (ShardPlan::make),
// DBRX_ERR_BAD_CHECKPOINT for an inconsistent config. After any rank fails or times out, forward
// throws DBRX_ERR_ENGINE_DEAD naming the rank, and so does every later call.
std::unique_ptr<Backend> make_sharded_cpu_backend(const Checkpoint &ckpt, const BackendOptions &options,
                                                  int32_t tp, int32_t ep, const ShardedCpuOptions &sharded = {});

// What the C API calls for the CPU device: the plain CPU backend when options.tp * options.ep == 1,
// otherwise the sharded one with options.tp and options.ep.
std::unique_ptr<Backend> make_parallel_cpu_backend(const Checkpoint &ckpt, const BackendOptions &options);

}  // namespace dbrx::dist
