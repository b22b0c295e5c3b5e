#include "dist/rank_threads.h"

#include <system_error>
#include <utility>

#include "util/error.h"

namespace dbrx::dist {

RankWorkers::RankWorkers(size_t n, ThreadStarter start_thread) : n_(n), start_thread_(std::move(start_thread)) {
    if (n == 0) invalid_argument("rank workers: a group needs at least one rank");
    if (!start_thread_) start_thread_ = [](std::function<void()> body) { return std::thread(std::move(body)); };
}

RankWorkers::~RankWorkers() { stop_workers(); }

std::string RankWorkers::start_workers() {
    if (threads_.size() == n_ - 1) return {};
    threads_.reserve(n_ - 1);
    try {
        // No run is in flight (run_mutex_ is held), so generation_ is stable: a new worker waits for the next one.
        for (size_t i = threads_.size() + 1; i < n_; ++i)
            threads_.push_back(start_thread_([this, i, seen = generation_] { work(i, seen); }));
    } catch (const std::system_error &e) {
        // The started workers are idle (no step was handed out): stop them so the next run starts afresh.
        stop_workers();
        return std::string("cannot start the rank threads: ") + e.what();
    }
    return {};
}

void RankWorkers::stop_workers() noexcept {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    work_cv_.notify_all();
    for (std::thread &t : threads_) t.join();
    threads_.clear();
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = false;
}

void RankWorkers::dispatch(RankJob job) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = job;
        pending_ = n_ - 1;
        ++generation_;
    }
    work_cv_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    job_ = RankJob();  // it refers to the caller's frame, gone after this returns
}

void RankWorkers::work(size_t rank, uint64_t seen) noexcept {
    for (;;) {
        RankJob job;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            work_cv_.wait(lock, [&] { return stopping_ || generation_ != seen; });
            if (stopping_) return;
            seen = generation_;
            job = job_;
        }
        job(rank);
        // Notified under the lock: once pending_ reads 0 the caller may return and destroy this object,
        // so the last worker must be done with done_cv_ before the caller can see it.
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_cv_.notify_one();
    }
}

}  // namespace dbrx::dist
