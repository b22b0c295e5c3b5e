// The steps of a group of in-process ranks (the sharded CPU and CUDA backends): rank 0 on the
// calling thread, every other rank on a worker thread of its own that lives as long as the group,
// and the group's failure. Persistent workers keep thread start and join (and a CUDA rank's first
// cudaSetDevice on a new thread) off the decode hot path.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace dbrx::dist {

// A borrowed, non-owning reference to a callable taking a rank index; it must outlive its calls.
// noexcept: an exception escaping it ends the process, as one escaping a thread would.
class RankJob {
public:
    template <class F>
        requires(!std::is_same_v<std::remove_cvref_t<F>, RankJob>)
    explicit RankJob(F &f) noexcept
        : obj_(&f), call_([](void *obj, size_t i) { (*static_cast<F *>(obj))(i); }) {}
    RankJob() = default;
    void operator()(size_t i) const noexcept { call_(obj_, i); }

private:
    void *obj_ = nullptr;
    void (*call_)(void *, size_t) = nullptr;
};

// n ranks; ranks 1..n-1 each run on a thread of their own, the same one on every step: ranks
// never share a thread, since two ranks on one thread would wait for each other in their
// collectives (util::ThreadPool does not promise that). The threads start at the first run.
// One run at a time (run holds a lock for the whole step). Destroy it only between runs: the
// destructor stops and joins the idle workers.
class RankWorkers {
public:
    // Starts a thread running `body` (a test seam: thread creation that fails).
    using ThreadStarter = std::function<std::thread(std::function<void()> body)>;

    // Throws DBRX_ERR_INVALID_ARGUMENT for n == 0.
    explicit RankWorkers(size_t n, ThreadStarter start_thread = {});
    ~RankWorkers();
    RankWorkers(const RankWorkers &) = delete;
    RankWorkers &operator=(const RankWorkers &) = delete;

    size_t size() const noexcept { return n_; }

    // Runs step(i) for every rank i of [0, n) and waits for all. A rank whose step throws records
    // label(i) + ": " + what as the group's failure if it is the first (the root cause: the others'
    // errors follow from the abort it triggers, or name the rank they timed out waiting for), then
    // calls abort(i, what) to release its peers. When the worker threads cannot all be started, the
    // started ones are stopped and joined, abort(0, ...) is called and no rank runs; the next run
    // tries to start them again. Returns the failure, empty when every rank succeeded. The workers
    // survive a failed step.
    template <class Step, class Label, class Abort>
    std::string run(Step &&step, Label &&label, Abort &&abort) {
        std::lock_guard<std::mutex> run_lock(run_mutex_);
        if (std::string failure = start_workers(); !failure.empty()) {
            abort(size_t{0}, failure);
            return failure;
        }
        std::mutex failure_mutex;
        std::string first_failure;
        auto run_rank = [&](size_t i) {
            try {
                step(i);
            } catch (const std::exception &e) {
                {
                    std::lock_guard<std::mutex> failure_lock(failure_mutex);
                    if (first_failure.empty()) first_failure = label(i) + ": " + e.what();
                }
                abort(i, std::string(e.what()));
            }
        };
        dispatch(RankJob(run_rank));
        return first_failure;
    }

private:
    // Starts the workers unless they run; returns "cannot start the rank threads: ..." on failure,
    // with none left running.
    std::string start_workers();
    void stop_workers() noexcept;
    // Hands job to every worker, runs job(0) here, returns when every rank finished.
    void dispatch(RankJob job);
    void work(size_t rank, uint64_t seen) noexcept;

    const size_t n_;
    ThreadStarter start_thread_;
    std::mutex run_mutex_;  // one run at a time

    std::mutex mutex_;  // guards what follows
    std::condition_variable work_cv_, done_cv_;
    uint64_t generation_ = 0;  // bumped per run: a worker runs each generation once, none is lost
    size_t pending_ = 0;       // workers still running the current generation
    bool stopping_ = false;
    RankJob job_;
    std::vector<std::thread> threads_;  // threads_[i - 1] runs rank i
};

}  // namespace dbrx::dist
