// One step of a group of in-process ranks (the sharded CPU and CUDA backends): rank 0 on the calling
// thread, every other rank on a thread of its own, and the group's failure.
#pragma once

#include <cstddef>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace dbrx::dist {

// Runs step(i) for the ranks i of [0, n). A rank whose step throws records label(i) + ": " + what as
// the group's failure if it is the first (the root cause: the others' errors follow from the abort
// it triggers, or name the rank they timed out waiting for), then calls abort(i, what) to release its
// peers. When the threads cannot all be started, the started ranks would wait at their first
// collective: abort(0, ...) releases them, they are joined and rank 0 does not run. Returns the
// failure, empty when every rank succeeded.
template <class Step, class Label, class Abort>
std::string run_rank_threads(size_t n, Step &&step, Label &&label, Abort &&abort) {
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
    std::vector<std::thread> threads;
    threads.reserve(n - 1);
    try {
        for (size_t i = 1; i < n; ++i) threads.emplace_back(run_rank, i);
    } catch (const std::system_error &e) {
        const std::string failure = std::string("cannot start the rank threads: ") + e.what();
        abort(0, failure);
        for (auto &t : threads) t.join();
        return failure;
    }
    run_rank(0);
    for (auto &t : threads) t.join();
    return first_failure;
}

}  // namespace dbrx::dist
