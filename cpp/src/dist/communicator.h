// The collectives a sharded forward pass needs, behind one interface with two implementations:
// ThreadCommunicator (ranks are threads of one process, CPU buffers; CI proves the sharded math
// with it) and NcclCommunicator (ranks are GPUs, device buffers; compiled with CUDA + NCCL).
//
// Every collective is synchronous for the caller and must be called by all ranks in the same order
// with the same sizes. None waits forever: after timeout() without the other ranks, or as soon as
// any rank called abort() or failed, it throws dbrx::Error(DBRX_ERR_ENGINE_DEAD) naming the rank at
// fault, and so do all later collectives: a group that failed once stays failed.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>

namespace dbrx::dist {

class Communicator {
public:
    virtual ~Communicator() = default;

    virtual int32_t rank() const = 0;
    virtual int32_t size() const = 0;
    // The longest any collective waits for the other ranks.
    virtual std::chrono::milliseconds timeout() const = 0;

    // data[i] = sum over ranks of data[i], in place; n equal on all ranks. The sum is taken in rank
    // order (ThreadCommunicator) so every rank gets bitwise the same result.
    virtual void all_reduce_sum(float *data, int64_t n) = 0;
    // recv[r * n + i] = rank r's send[i]; recv holds size() * n floats and must not overlap send.
    virtual void all_gather(const float *send, int64_t n, float *recv) = 0;
    // Personalised exchange: rank r sends send_counts[p] floats to each peer p (consecutive in send,
    // in peer order) and receives recv_counts[p] floats from each peer p (consecutive in recv, in
    // peer order). recv_counts[p] on rank r must equal send_counts[r] on rank p.
    virtual void all_to_all_v(const float *send, std::span<const int64_t> send_counts, float *recv,
                              std::span<const int64_t> recv_counts) = 0;
    virtual void barrier() = 0;

    // Marks the group failed: every rank's pending and later collectives throw ENGINE_DEAD with
    // `reason`, promptly (ThreadCommunicator) or within the peers' timeout (NCCL across processes).
    // Safe to call from any thread, more than once; the first reason wins.
    virtual void abort(const std::string &reason) noexcept = 0;
    virtual bool aborted() const = 0;
};

}  // namespace dbrx::dist
