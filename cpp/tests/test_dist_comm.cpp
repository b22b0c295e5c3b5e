// ThreadCommunicator: collective results, determinism, and the failure contract (a rank that
// aborts, throws or stops participating makes every other rank throw within a bounded time).
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dist/thread_communicator.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// What one rank's body did: the error it threw (if any) and how long after the start.
struct Outcome {
    std::optional<dbrx_status> status;
    std::string message;
    std::chrono::milliseconds elapsed{0};
};

// Runs body(comm) on one thread per rank and collects each rank's outcome.
std::vector<Outcome> run_ranks(int32_t size, std::chrono::milliseconds timeout,
                               const std::function<void(Communicator &)> &body) {
    auto comms = ThreadCommunicator::create_group(size, timeout);
    std::vector<Outcome> out(static_cast<size_t>(size));
    std::vector<std::thread> threads;
    const auto start = Clock::now();
    for (int32_t r = 0; r < size; ++r)
        threads.emplace_back([&, r] {
            try {
                body(*comms[r]);
            } catch (const Error &e) {
                out[r].status = e.status();
                out[r].message = e.what();
            }
            out[r].elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
        });
    for (auto &t : threads) t.join();
    return out;
}

bool contains(const std::string &s, const std::string &needle) { return s.find(needle) != std::string::npos; }

TEST(DistThreadComm, CollectivesGiveTheSameResultOnEveryRank) {
    for (int32_t size : {1, 2, 3, 4}) {
        SCOPED_TRACE("size " + std::to_string(size));
        std::vector<std::vector<float>> reduced(size), gathered(size), exchanged(size);
        auto out = run_ranks(size, 5000ms, [&](Communicator &c) {
            const int32_t r = c.rank();
            EXPECT_EQ(c.size(), size);
            std::vector<float> v = {float(r + 1), float(10 * r), -0.5f, 3.0f};
            c.all_reduce_sum(v.data(), 4);
            reduced[r] = v;
            std::vector<float> mine = {float(r), float(r) + 0.25f}, all(2 * size);
            c.all_gather(mine.data(), 2, all.data());
            gathered[r] = all;
            // Rank r sends p + 1 copies of 100 r + p to each peer p.
            std::vector<float> send;
            std::vector<int64_t> send_counts, recv_counts;
            for (int32_t p = 0; p < size; ++p) {
                send_counts.push_back(p + 1);
                recv_counts.push_back(r + 1);
                for (int32_t i = 0; i <= p; ++i) send.push_back(float(100 * r + p));
            }
            std::vector<float> recv(static_cast<size_t>(size) * (r + 1));
            c.all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
            exchanged[r] = recv;
            c.barrier();
        });
        float sum_r1 = 0, sum_10r = 0;
        for (int32_t r = 0; r < size; ++r) {
            sum_r1 += float(r + 1);
            sum_10r += float(10 * r);
        }
        for (int32_t r = 0; r < size; ++r) {
            EXPECT_FALSE(out[r].status) << out[r].message;
            EXPECT_EQ(reduced[r], (std::vector<float>{sum_r1, sum_10r, -0.5f * size, 3.0f * size}));
            for (int32_t p = 0; p < size; ++p) {
                EXPECT_EQ(gathered[r][2 * p], float(p));
                EXPECT_EQ(gathered[r][2 * p + 1], float(p) + 0.25f);
                for (int32_t i = 0; i <= r; ++i) EXPECT_EQ(exchanged[r][p * (r + 1) + i], float(100 * p + r));
            }
        }
    }
}

TEST(DistThreadComm, AllReduceSumsInRankOrder) {
    // In float, ((1e8 + 1) - 1e8) + 1 = 1 while other orders give 0 or 2: every rank must get 1.
    std::vector<float> got(4);
    auto out = run_ranks(4, 5000ms, [&](Communicator &c) {
        const float v[] = {1e8f, 1.0f, -1e8f, 1.0f};
        float x = v[c.rank()];
        // Stagger the ranks so that arrival order differs from rank order.
        std::this_thread::sleep_for(std::chrono::milliseconds(10 * (3 - c.rank())));
        c.all_reduce_sum(&x, 1);
        got[c.rank()] = x;
    });
    for (int32_t r = 0; r < 4; ++r) {
        EXPECT_FALSE(out[r].status) << out[r].message;
        EXPECT_EQ(got[r], 1.0f) << "rank " << r;
    }
}

TEST(DistThreadComm, MissingRankTimesOutEveryoneWithinBound) {
    // Rank 2 never joins: ranks 0 and 1 must fail after the 1 s timeout, well before 2 s, naming it.
    auto out = run_ranks(3, 1000ms, [&](Communicator &c) {
        if (c.rank() == 2) return;
        float x = 1;
        c.all_reduce_sum(&x, 1);
    });
    for (int32_t r : {0, 1}) {
        ASSERT_TRUE(out[r].status) << "rank " << r << " did not fail";
        EXPECT_EQ(*out[r].status, DBRX_ERR_ENGINE_DEAD);
        EXPECT_TRUE(contains(out[r].message, "waiting for rank(s) 2")) << out[r].message;
        EXPECT_GE(out[r].elapsed, 900ms);
        EXPECT_LT(out[r].elapsed, 2000ms);
    }
}

TEST(DistThreadComm, RankThatStopsMidRunFailsTheOthers) {
    // Rank 1 takes part in 5 collectives, then stalls for 2.5 s (a hung device, a stuck process).
    auto out = run_ranks(3, 1000ms, [&](Communicator &c) {
        for (int i = 0; i < 20; ++i) {
            if (c.rank() == 1 && i == 5) std::this_thread::sleep_for(2500ms);
            float x = float(i);
            c.all_reduce_sum(&x, 1);
        }
    });
    for (int32_t r : {0, 2}) {
        ASSERT_TRUE(out[r].status) << "rank " << r << " did not fail";
        EXPECT_EQ(*out[r].status, DBRX_ERR_ENGINE_DEAD);
        EXPECT_TRUE(contains(out[r].message, "rank(s) 1")) << out[r].message;
        EXPECT_LT(out[r].elapsed, 2000ms);
    }
    // The stalled rank finds the group failed when it comes back, instead of waiting again.
    ASSERT_TRUE(out[1].status);
    EXPECT_EQ(*out[1].status, DBRX_ERR_ENGINE_DEAD);
    EXPECT_LT(out[1].elapsed, 3500ms);
}

TEST(DistThreadComm, AbortFromOneRankFailsPendingCollectivesPromptly) {
    // Rank 3 throws mid-run; its handler aborts the group. The others are blocked in (or about to
    // enter) a collective with a 30 s timeout and must fail at once, with rank 3's reason.
    auto out = run_ranks(4, 30000ms, [&](Communicator &c) {
        for (int i = 0; i < 10; ++i) {
            if (c.rank() == 3 && i == 4) {
                try {
                    throw std::runtime_error("expert GEMM failed");
                } catch (const std::exception &e) {
                    c.abort(e.what());
                    EXPECT_TRUE(c.aborted());
                    return;
                }
            }
            std::vector<float> v(64, 1.0f), all(64 * 4);
            c.all_gather(v.data(), 64, all.data());
        }
    });
    for (int32_t r : {0, 1, 2}) {
        ASSERT_TRUE(out[r].status) << "rank " << r << " did not fail";
        EXPECT_EQ(*out[r].status, DBRX_ERR_ENGINE_DEAD);
        EXPECT_TRUE(contains(out[r].message, "rank 3 aborted: expert GEMM failed")) << out[r].message;
        EXPECT_LT(out[r].elapsed, 1000ms);
    }
}

TEST(DistThreadComm, MismatchedCallsFailInsteadOfCorrupting) {
    auto out = run_ranks(2, 5000ms, [&](Communicator &c) {
        std::vector<float> v(8, 1.0f), all(16);
        if (c.rank() == 0) c.all_reduce_sum(v.data(), 8);
        else c.all_gather(v.data(), 8, all.data());
    });
    for (int32_t r : {0, 1}) {
        ASSERT_TRUE(out[r].status);
        EXPECT_TRUE(contains(out[r].message, "collective mismatch")) << out[r].message;
    }
    auto sizes = run_ranks(2, 5000ms, [&](Communicator &c) {
        std::vector<float> v(8, 1.0f);
        c.all_reduce_sum(v.data(), c.rank() == 0 ? 8 : 4);
    });
    EXPECT_TRUE(sizes[0].status && sizes[1].status);
    auto counts = run_ranks(2, 5000ms, [&](Communicator &c) {
        std::vector<float> send(4, 1.0f), recv(8);
        std::vector<int64_t> sc = {2, 2}, rc = {c.rank() == 1 ? 3 : 2, 2};
        c.all_to_all_v(send.data(), sc, recv.data(), rc);
    });
    ASSERT_TRUE(counts[1].status);
    EXPECT_TRUE(contains(counts[1].message, "rank 0 sends 2 floats but rank 1 expects 3")) << counts[1].message;
    EXPECT_TRUE(counts[0].status);
}

TEST(DistThreadComm, RejectsBadGroups) {
    EXPECT_THROW(ThreadCommunicator::create_group(0, 1000ms), Error);
    EXPECT_THROW(ThreadCommunicator::create_group(2, 0ms), Error);
}

}  // namespace
}  // namespace dbrx::dist
