// Communicator over NCCL, one per GPU rank; buffers passed to the collectives are DEVICE pointers.
// Defined only in builds with CUDA and NCCL (DBRX_WITH_NCCL); the header itself needs neither.
//
// Process model: one process drives all of its host's GPUs, one thread per GPU rank (like the
// sharded CPU backend's threads); hosts meet through the TCP rendezvous (dist/tcp_rendezvous.h),
// which hands NCCL's unique id from process 0 to the others. Process p of P with G local GPUs owns
// the NCCL ranks p * G .. p * G + G - 1.
//
// Never a hang: communicators are created non-blocking (ncclConfig_t::blocking = 0). Every call
// (for the enqueue_* collectives of a rank's step: the step's finish_step()) is followed by polling
// ncclCommGetAsyncError and the stream until done, an error, an abort() of any rank of this
// process, or timeout(); then the communicator is ncclCommAbort-ed and the call throws
// DBRX_ERR_ENGINE_DEAD naming the rank. Ranks in other processes see the aborted peer as a remote
// error reported by NCCL, or at worst hit their own timeout.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/tcp_rendezvous.h"

namespace dbrx::dist {

// Shared by the communicators of one process: an abort() on any of them fails all of them.
struct LocalAbort;

class NcclCommunicator final : public Communicator {
public:
    ~NcclCommunicator() override;

    int32_t rank() const override { return rank_; }
    int32_t size() const override { return size_; }
    std::chrono::milliseconds timeout() const override { return timeout_; }
    int32_t device() const { return device_; }
    // The cudaStream_t the collectives run on (the communicator's own unless set_stream was called).
    void *stream() const { return stream_; }
    // Runs the collectives on the caller's stream (a backend's compute stream), so they order with
    // its kernels without events. The stream must belong to device() and outlive this object.
    void set_stream(void *cuda_stream) { stream_ = cuda_stream; }

    void all_reduce_sum(float *data, int64_t n) override;
    void all_gather(const float *send, int64_t n, float *recv) override;
    void all_to_all_v(const float *send, std::span<const int64_t> send_counts, float *recv,
                      std::span<const int64_t> recv_counts) override;
    void barrier() override;
    void abort(const std::string &reason) noexcept override;

    // Enqueue-only collectives for a rank's step: they return once NCCL has queued the work on
    // stream() (no wait for the GPU, so they may be captured in a CUDA graph); finish_step() then
    // waits for the stream once. Failures NCCL reports while queueing abort and throw as above.
    void enqueue_all_reduce_sum(float *data, int64_t n);
    void enqueue_all_gather(const float *send, int64_t n, float *recv);
    // Waits until stream() has drained (the step's kernels and collectives), polling
    // ncclCommGetAsyncError, the local abort flag and timeout(); on failure aborts and throws ENGINE_DEAD.
    void finish_step();
    bool aborted() const override;

    // Creates this process's ranks, one per entry of `devices` (CUDA ordinals). Process 0 makes the
    // unique id and serves it through the rendezvous; all processes must pass the same number of
    // devices. Throws DBRX_ERR_UNSUPPORTED without enough CUDA devices, the rendezvous' errors, or
    // DBRX_ERR_ENGINE_DEAD when NCCL initialisation fails or outlasts `timeout`.
    static std::vector<std::unique_ptr<NcclCommunicator>> create_local(const RendezvousConfig &rendezvous,
                                                                       std::span<const int32_t> devices,
                                                                       std::chrono::milliseconds timeout);

private:
    struct Handle;
    NcclCommunicator(std::unique_ptr<Handle> comm, int32_t rank, int32_t size, int32_t device,
                     std::chrono::milliseconds timeout, std::shared_ptr<LocalAbort> local);
    // Waits until NCCL queued the call (non-blocking communicators may return ncclInProgress) and,
    // with wait_stream, until the stream finished it; on failure or timeout aborts and throws.
    void complete(const char *what, int result, bool wait_stream = true);
    [[noreturn]] void die(const std::string &why);

    std::unique_ptr<Handle> comm_;
    int32_t rank_, size_, device_;
    std::chrono::milliseconds timeout_;
    std::shared_ptr<LocalAbort> local_;
    void *own_stream_ = nullptr;
    void *stream_ = nullptr;
    float *scratch_ = nullptr;  // one device float for barrier()
};

}  // namespace dbrx::dist
