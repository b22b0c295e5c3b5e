// RankWorkers (dist/rank_threads.h): every rank runs concurrently with the others (they meet at a
// barrier, as at a collective), rank 0 on the caller and rank i >= 1 on the same thread of its own
// on every run; a rank that throws gives the group's failure and the abort calls, and the workers
// serve the next run; threads that cannot be started fail the run with abort(0, ...) and none left
// running; destruction joins idle workers promptly.
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "dist/rank_threads.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

std::string label(size_t i) { return "rank " + std::to_string(i); }

// Unique to each thread ever started, unlike std::thread::id, which a new thread may reuse.
uint64_t thread_serial() {
    static std::atomic<uint64_t> next{1};
    thread_local const uint64_t mine = next++;
    return mine;
}

// What abort was called with, from any thread.
struct AbortLog {
    std::mutex mutex;
    std::vector<std::pair<size_t, std::string>> calls;
    void operator()(size_t i, const std::string &why) {
        std::lock_guard<std::mutex> lock(mutex);
        calls.emplace_back(i, why);
    }
};

// Starts real threads, counting the bodies still running; fails once `fail_after` threads started.
struct CountingStarter {
    std::atomic<int> started{0}, running{0};
    int fail_after = -1;
    RankWorkers::ThreadStarter starter() {
        return [this](std::function<void()> body) {
            if (fail_after >= 0 && started.load() >= fail_after)
                throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                                        "injected thread limit");
            ++started;
            ++running;
            return std::thread([this, body = std::move(body)] {
                body();
                --running;
            });
        };
    }
};

TEST(DistRankWorkers, ThrowingRankFailsTheRunAbortsItsPeersAndTheWorkersServeTheNextRun) {
    constexpr size_t kRanks = 4;
    RankWorkers workers(kRanks);
    // A stand-in for a communicator: ranks other than 2 wait at a "collective" that only an abort ends.
    std::mutex mutex;
    std::condition_variable cv;
    bool aborted = false;
    AbortLog log;
    auto abort = [&](size_t i, const std::string &why) {
        log(i, why);
        std::lock_guard<std::mutex> lock(mutex);
        aborted = true;
        cv.notify_all();
    };
    const std::string failure = workers.run(
        [&](size_t i) {
            if (i == 2) throw std::runtime_error("injected fault");
            std::unique_lock<std::mutex> lock(mutex);
            if (!cv.wait_for(lock, 10s, [&] { return aborted; })) throw std::runtime_error("never released");
            throw std::runtime_error("peer aborted");
        },
        label, abort);
    EXPECT_EQ(failure, "rank 2: injected fault");
    ASSERT_EQ(log.calls.size(), kRanks);  // every failing rank aborts once
    EXPECT_EQ(log.calls[0], (std::pair<size_t, std::string>{2, "injected fault"}));
    std::set<size_t> aborting;
    for (size_t k = 1; k < log.calls.size(); ++k) {
        EXPECT_EQ(log.calls[k].second, "peer aborted");
        aborting.insert(log.calls[k].first);
    }
    EXPECT_EQ(aborting, (std::set<size_t>{0, 1, 3}));

    std::vector<int> ran(kRanks, 0);
    AbortLog none;
    EXPECT_EQ(workers.run([&](size_t i) { ++ran[i]; }, label, std::ref(none)), "");
    EXPECT_EQ(ran, std::vector<int>(kRanks, 1));
    EXPECT_TRUE(none.calls.empty());
}

TEST(DistRankWorkers, ManyRunsKeepEveryRankOnItsOwnThreadAndRunThemTogether) {
    constexpr size_t kRanks = 4;
    constexpr int kRuns = 10000;
    RankWorkers workers(kRanks);
    // Every rank waits for all the others, as at a collective: two ranks on one thread would hang.
    std::barrier meet(static_cast<std::ptrdiff_t>(kRanks));
    std::vector<uint64_t> first(kRanks);
    std::vector<int> moved(kRanks, 0), ran(kRanks, 0);  // rank i's slots are written by rank i only
    AbortLog log;
    const auto start = Clock::now();
    for (int run = 0; run < kRuns; ++run) {
        const std::string failure = workers.run(
            [&](size_t i) {
                meet.arrive_and_wait();
                const uint64_t id = thread_serial();
                if (run == 0) first[i] = id;
                if (id != first[i]) ++moved[i];
                ++ran[i];
            },
            label, std::ref(log));
        ASSERT_EQ(failure, "") << "run " << run;
    }
    const auto elapsed = Clock::now() - start;
    EXPECT_EQ(ran, std::vector<int>(kRanks, kRuns));
    EXPECT_EQ(moved, std::vector<int>(kRanks, 0));
    EXPECT_EQ(first[0], thread_serial());
    EXPECT_EQ(std::set<uint64_t>(first.begin(), first.end()).size(), kRanks);
    EXPECT_TRUE(log.calls.empty());
    // A handful of wake-ups per run; generous for a loaded two-core CI machine.
    EXPECT_LT(elapsed, 30s) << std::chrono::duration<double>(elapsed).count() << " s for " << kRuns << " runs";
}

TEST(DistRankWorkers, ThreadsThatCannotStartFailTheRunWithNoneLeftRunning) {
    CountingStarter counting;
    counting.fail_after = 1;  // rank 1's thread starts, rank 2's cannot
    RankWorkers workers(4, counting.starter());
    AbortLog log;
    std::atomic<int> steps{0};
    const std::string failure = workers.run([&](size_t) { ++steps; }, label, std::ref(log));
    EXPECT_EQ(failure.rfind("cannot start the rank threads: ", 0), 0u) << failure;
    EXPECT_NE(failure.find("injected thread limit"), std::string::npos) << failure;
    ASSERT_EQ(log.calls.size(), 1u);
    EXPECT_EQ(log.calls[0].first, 0u);
    EXPECT_EQ(log.calls[0].second, failure);
    EXPECT_EQ(steps.load(), 0);  // no rank ran
    EXPECT_EQ(counting.running.load(), 0);  // the started worker was joined

    counting.fail_after = -1;  // threads can start again: the next run starts them all
    std::vector<int> ran(4, 0);
    EXPECT_EQ(workers.run([&](size_t i) { ++ran[i]; }, label, std::ref(log)), "");
    EXPECT_EQ(ran, std::vector<int>(4, 1));
    EXPECT_EQ(counting.running.load(), 3);
}

TEST(DistRankWorkers, DestructionJoinsIdleWorkersPromptly) {
    CountingStarter counting;
    {
        RankWorkers never_ran(3, counting.starter());  // threads start lazily: none to join
    }
    EXPECT_EQ(counting.started.load(), 0);
    auto workers = std::make_unique<RankWorkers>(4, counting.starter());
    AbortLog log;
    for (int run = 0; run < 3; ++run) ASSERT_EQ(workers->run([](size_t) {}, label, std::ref(log)), "");
    EXPECT_EQ(counting.started.load(), 3);  // started once, kept across runs
    EXPECT_EQ(counting.running.load(), 3);
    std::this_thread::sleep_for(50ms);  // let the workers go back to waiting
    const auto start = Clock::now();
    workers.reset();
    EXPECT_LT(Clock::now() - start, 1s);
    EXPECT_EQ(counting.running.load(), 0);
}

TEST(DistRankWorkers, OneRankRunsOnTheCallerAndNoRanksIsRejected) {
    CountingStarter counting;
    RankWorkers one(1, counting.starter());
    std::thread::id ran_on;
    AbortLog log;
    EXPECT_EQ(one.run([&](size_t) { ran_on = std::this_thread::get_id(); }, label, std::ref(log)), "");
    EXPECT_EQ(ran_on, std::this_thread::get_id());
    EXPECT_EQ(counting.started.load(), 0);
    EXPECT_EQ(one.run([](size_t) { throw std::runtime_error("alone"); }, label, std::ref(log)), "rank 0: alone");
    ASSERT_EQ(log.calls.size(), 1u);
    EXPECT_EQ(log.calls[0], (std::pair<size_t, std::string>{0, "alone"}));
    EXPECT_THROW(RankWorkers(0), Error);
}

}  // namespace
}  // namespace dbrx::dist
