// In-process Communicator: the ranks are threads of one process sharing host buffers. Each
// collective is two rendezvous: all ranks publish their buffers, each computes its own result from
// the others' buffers (sums in rank order, so every rank gets bitwise the same values whatever the
// timing), then all meet again before anyone may reuse its buffers.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "dist/communicator.h"

namespace dbrx::dist {

class ThreadGroup;

class ThreadCommunicator final : public Communicator {
public:
    // `size` communicators sharing one group; give communicator r to the thread that runs rank r.
    // Throws DBRX_ERR_INVALID_ARGUMENT for size < 1 or a non-positive timeout.
    static std::vector<std::unique_ptr<ThreadCommunicator>> create_group(int32_t size,
                                                                         std::chrono::milliseconds timeout);

    ThreadCommunicator(std::shared_ptr<ThreadGroup> group, int32_t rank);
    ~ThreadCommunicator() override;

    int32_t rank() const override { return rank_; }
    int32_t size() const override;
    std::chrono::milliseconds timeout() const override;

    void all_reduce_sum(float *data, int64_t n) override;
    void all_gather(const float *send, int64_t n, float *recv) override;
    void all_to_all_v(const float *send, std::span<const int64_t> send_counts, float *recv,
                      std::span<const int64_t> recv_counts) override;
    void barrier() override;
    void abort(const std::string &reason) noexcept override;
    bool aborted() const override;

private:
    std::shared_ptr<ThreadGroup> group_;
    int32_t rank_;
    std::vector<float> scratch_;
};

}  // namespace dbrx::dist
