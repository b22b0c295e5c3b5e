#include "util/thread_pool.h"

#include <algorithm>

namespace dbrx {
namespace {

constexpr int kSpinIterations = 4000;  // some tens of microseconds

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
}

// Spins until pred() holds or the budget runs out; true when it holds.
template <typename Pred>
bool spin_until(Pred pred) {
    for (int i = 0; i < kSpinIterations; ++i) {
        if (pred()) return true;
        cpu_relax();
    }
    return false;
}

}  // namespace

ThreadPool::ThreadPool(int32_t n_threads) {
    if (n_threads <= 0) n_threads = static_cast<int32_t>(std::thread::hardware_concurrency());
    n_threads_ = std::max<int32_t>(1, n_threads);
    workers_.reserve(n_threads_ - 1);
    for (int32_t i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    start_cv_.notify_all();
    for (auto &t : workers_) t.join();
}

void ThreadPool::run_slice(int32_t index) {
    if (index >= job_slices_) return;
    int64_t begin = job_n_ * index / job_slices_;
    int64_t end = job_n_ * (index + 1) / job_slices_;
    if (begin >= end) return;
    try {
        (*job_)(begin, end);
    } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
    }
}

void ThreadPool::worker_loop(int32_t index) {
    uint64_t seen = 0;
    for (;;) {
        spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
        {
            std::unique_lock<std::mutex> lock(mutex_);
            start_cv_.wait(lock, [&] { return stopping_ || generation_.load() != seen; });
            if (stopping_) return;
            seen = generation_.load();
        }
        run_slice(index);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lock(mutex_);  // the caller may be asleep on done_cv_
            done_cv_.notify_one();
        }
    }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)> &fn, int64_t grain) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    int64_t slices = std::min<int64_t>(n_threads_, (n + grain - 1) / grain);
    if (slices <= 1) {
        fn(0, n);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = &fn;
        job_n_ = n;
        job_slices_ = static_cast<int32_t>(slices);
        pending_.store(n_threads_ - 1);
        error_ = nullptr;
        generation_.fetch_add(1, std::memory_order_release);
    }
    start_cv_.notify_all();
    run_slice(0);
    std::exception_ptr error;
    spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
    {
        std::unique_lock<std::mutex> lock(mutex_);
        done_cv_.wait(lock, [&] { return pending_.load() == 0; });
        job_ = nullptr;
        error = error_;
    }
    if (error) std::rethrow_exception(error);
}

}  // namespace dbrx
