// A small fork-join pool for the CPU backend: parallel_for splits [0, n) into one contiguous slice
// per thread and blocks until every slice is done. Which thread runs a slice never changes the
// result, because the kernels compute every output element wholly inside one slice.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dbrx {

class ThreadPool {
public:
    // n_threads <= 0 means std::thread::hardware_concurrency() (at least 1). The caller's thread
    // is one of them, so n_threads - 1 workers are started.
    explicit ThreadPool(int32_t n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;

    int32_t size() const { return n_threads_; }

    // Calls fn(begin, end) on disjoint slices covering [0, n); slices hold at least `grain` items
    // (except the last), so tiny loops stay on one thread. Rethrows the first exception a slice threw.
    // Not reentrant: fn must not call parallel_for on the same pool.
    void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)> &fn, int64_t grain = 1);

private:
    void worker_loop(int32_t index);
    void run_slice(int32_t index);

    int32_t n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable start_cv_;
    std::condition_variable done_cv_;
    // Workers and the caller spin briefly on these before sleeping: a decode step of a small model is
    // dozens of short loops, and a futex wake-up per loop would cost more than the loop.
    std::atomic<uint64_t> generation_{0};
    std::atomic<int32_t> pending_{0};
    bool stopping_ = false;
    // The job of the current generation (written under mutex_ before generation_ moves).
    const std::function<void(int64_t, int64_t)> *job_ = nullptr;
    int64_t job_n_ = 0;
    int32_t job_slices_ = 0;
    std::exception_ptr error_;
};

}  // namespace dbrx
