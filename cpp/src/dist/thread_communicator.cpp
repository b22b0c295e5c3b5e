#include "dist/thread_communicator.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <string>

#include "util/error.h"

namespace dbrx::dist {

namespace {

enum class Op { AllReduce, AllGather, AllToAll, Barrier };

const char *op_name(Op op) {
    switch (op) {
        case Op::AllReduce: return "all_reduce_sum";
        case Op::AllGather: return "all_gather";
        case Op::AllToAll: return "all_to_all_v";
        case Op::Barrier: return "barrier";
    }
    return "?";
}

// What one rank published for the current collective. The data and counts are copies owned by
// the group: a rank whose collective throws (the group failed) may free its own buffers while a
// peer is still reading, so peers never read the caller's memory.
struct Slot {
    Op op = Op::Barrier;
    int64_t n = 0;
    std::vector<float> data;
    std::vector<int64_t> send_counts;
};

}  // namespace

class ThreadGroup {
public:
    ThreadGroup(int32_t size, std::chrono::milliseconds timeout)
        : size_(size), timeout_(timeout), arrived_at_(static_cast<size_t>(size), 0), slots_(static_cast<size_t>(size)) {}

    int32_t size() const { return size_; }
    std::chrono::milliseconds timeout() const { return timeout_; }
    const Slot &slot(int32_t rank) const { return slots_[rank]; }

    // Publishes a copy of `count` floats of `data` (phase 1) and waits for every rank to do the
    // same; checks they all called the same collective with the same size. Throws ENGINE_DEAD on
    // timeout or failure.
    void publish_and_wait(int32_t rank, Op op, int64_t n, const float *data, int64_t count,
                          std::span<const int64_t> send_counts = {}) {
        {
            // Once failed, a slot is never rewritten: a peer that threw mid-collective may still read it.
            std::lock_guard<std::mutex> lock(mutex_);
            if (failed_) throw_failure(rank);
        }
        // Only this rank writes its slot, and no peer reads it before the rendezvous below.
        Slot &mine = slots_[rank];
        mine.op = op;
        mine.n = n;
        mine.data.assign(data, data + count);
        mine.send_counts.assign(send_counts.begin(), send_counts.end());
        std::unique_lock<std::mutex> lock(mutex_);
        if (meet(lock, rank, op_name(op))) check_same_call_locked();
        if (failed_) throw_failure(rank);
    }

    // Phase 2: nobody reuses its buffers until every rank has read what it needed.
    void wait_all(int32_t rank, Op op) {
        std::unique_lock<std::mutex> lock(mutex_);
        meet(lock, rank, op_name(op));
    }

    void abort(int32_t rank, const std::string &reason) noexcept {
        try {
            std::lock_guard<std::mutex> lock(mutex_);
            fail_locked("rank " + std::to_string(rank) + " aborted: " + reason);
        } catch (...) {
            // Out of memory building the message: the group still has to fail.
            std::lock_guard<std::mutex> lock(mutex_);
            failed_ = true;
        }
        cv_.notify_all();
    }

    bool failed() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return failed_;
    }

private:
    // Returns true on the thread that completed the rendezvous (the last to arrive).
    bool meet(std::unique_lock<std::mutex> &lock, int32_t rank, const char *what) {
        if (failed_) throw_failure(rank);
        const uint64_t gen = generation_;
        arrived_at_[rank] = gen + 1;
        if (++arrived_ == size_) {
            arrived_ = 0;
            ++generation_;
            cv_.notify_all();
            return true;
        }
        const auto deadline = std::chrono::steady_clock::now() + timeout_;
        if (!cv_.wait_until(lock, deadline, [&] { return generation_ != gen || failed_; })) {
            std::string missing;
            for (int32_t r = 0; r < size_; ++r)
                if (arrived_at_[r] != gen + 1) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
            fail_locked("rank " + std::to_string(rank) + ": " + what + " timed out after " +
                        std::to_string(timeout_.count()) + " ms waiting for rank(s) " + missing);
            cv_.notify_all();
        }
        if (failed_) throw_failure(rank);
        return false;
    }

    void check_same_call_locked() {
        const Slot &first = slots_[0];
        for (int32_t r = 1; r < size_; ++r) {
            const Slot &s = slots_[r];
            bool same = s.op == first.op && (s.op == Op::AllToAll || s.n == first.n);
            if (!same) {
                fail_locked(std::string("collective mismatch: rank 0 called ") + op_name(first.op) + "(n " +
                            std::to_string(first.n) + "), rank " + std::to_string(r) + " called " + op_name(s.op) +
                            "(n " + std::to_string(s.n) + ")");
                cv_.notify_all();
                return;
            }
        }
    }

    void fail_locked(const std::string &why) {
        if (failed_) return;
        failed_ = true;
        failure_ = why;
    }

    [[noreturn]] void throw_failure(int32_t rank) const {
        fail(DBRX_ERR_ENGINE_DEAD, "thread communicator (rank " + std::to_string(rank) + " of " +
                                       std::to_string(size_) + "): group failed: " + failure_);
    }

    const int32_t size_;
    const std::chrono::milliseconds timeout_;
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    uint64_t generation_ = 0;            // completed rendezvous
    int32_t arrived_ = 0;                // ranks waiting in the current one
    std::vector<uint64_t> arrived_at_;   // per rank: generation + 1 of its latest arrival
    std::vector<Slot> slots_;
    bool failed_ = false;
    std::string failure_;
};

std::vector<std::unique_ptr<ThreadCommunicator>> ThreadCommunicator::create_group(int32_t size,
                                                                                  std::chrono::milliseconds timeout) {
    if (size < 1) invalid_argument("thread communicator: group size " + std::to_string(size) + " must be >= 1");
    if (timeout.count() <= 0)
        invalid_argument("thread communicator: timeout " + std::to_string(timeout.count()) + " ms must be positive");
    auto group = std::make_shared<ThreadGroup>(size, timeout);
    std::vector<std::unique_ptr<ThreadCommunicator>> comms;
    for (int32_t r = 0; r < size; ++r) comms.push_back(std::make_unique<ThreadCommunicator>(group, r));
    return comms;
}

ThreadCommunicator::ThreadCommunicator(std::shared_ptr<ThreadGroup> group, int32_t rank)
    : group_(std::move(group)), rank_(rank) {}

ThreadCommunicator::~ThreadCommunicator() = default;

int32_t ThreadCommunicator::size() const { return group_->size(); }
std::chrono::milliseconds ThreadCommunicator::timeout() const { return group_->timeout(); }

void ThreadCommunicator::all_reduce_sum(float *data, int64_t n) {
    group_->publish_and_wait(rank_, Op::AllReduce, n, data, n);
    scratch_.assign(static_cast<size_t>(n), 0.0f);
    for (int32_t r = 0; r < size(); ++r) {
        const float *src = group_->slot(r).data.data();
        for (int64_t i = 0; i < n; ++i) scratch_[i] += src[i];
    }
    group_->wait_all(rank_, Op::AllReduce);
    std::copy_n(scratch_.data(), n, data);
}

void ThreadCommunicator::all_gather(const float *send, int64_t n, float *recv) {
    group_->publish_and_wait(rank_, Op::AllGather, n, send, n);
    for (int32_t r = 0; r < size(); ++r) std::copy_n(group_->slot(r).data.data(), n, recv + r * n);
    group_->wait_all(rank_, Op::AllGather);
}

void ThreadCommunicator::all_to_all_v(const float *send, std::span<const int64_t> send_counts, float *recv,
                                      std::span<const int64_t> recv_counts) {
    const std::string where = "thread communicator (rank " + std::to_string(rank_) + "): all_to_all_v: ";
    if (static_cast<int32_t>(send_counts.size()) != size() || static_cast<int32_t>(recv_counts.size()) != size()) {
        // The peers would wait for this rank until their timeout: fail the group now.
        abort(where + "count arrays must have one entry per rank");
        invalid_argument(where + "count arrays must have one entry per rank, got " +
                         std::to_string(send_counts.size()) + " and " + std::to_string(recv_counts.size()));
    }
    int64_t total = 0;
    for (int64_t c : send_counts) {
        if (c < 0) {
            abort(where + "negative count");
            invalid_argument(where + "negative count " + std::to_string(c));
        }
        total += c;
    }
    group_->publish_and_wait(rank_, Op::AllToAll, 0, send, total, send_counts);
    std::string mismatch;
    int64_t out = 0;
    for (int32_t p = 0; p < size(); ++p) {
        const Slot &peer = group_->slot(p);
        int64_t offset = 0;
        for (int32_t q = 0; q < rank_; ++q) offset += peer.send_counts[q];
        if (peer.send_counts[rank_] != recv_counts[p]) {
            mismatch = "rank " + std::to_string(p) + " sends " + std::to_string(peer.send_counts[rank_]) +
                       " floats but rank " + std::to_string(rank_) + " expects " + std::to_string(recv_counts[p]);
            break;
        }
        std::copy_n(peer.data.data() + offset, recv_counts[p], recv + out);
        out += recv_counts[p];
    }
    if (!mismatch.empty()) abort("all_to_all_v: " + mismatch);
    group_->wait_all(rank_, Op::AllToAll);
}

void ThreadCommunicator::barrier() { group_->publish_and_wait(rank_, Op::Barrier, 0, nullptr, 0); }

void ThreadCommunicator::abort(const std::string &reason) noexcept { group_->abort(rank_, reason); }

bool ThreadCommunicator::aborted() const { return group_->failed(); }

}  // namespace dbrx::dist
