// Helpers of the step channel tests: connected localhost TCP sockets, a leader/follower group over
// them, and a backend that records every command it runs.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dist/step_channel.h"
#include "dist/step_wire.h"
#include "dist/unique_fd.h"
#include "model/backend.h"
#include "util/error.h"

namespace dbrx::testing {

using OwnedFd = dist::UniqueFd;

// Two ends of one localhost TCP connection.
inline std::pair<OwnedFd, OwnedFd> tcp_pair() {
    OwnedFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(listener.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) != 0 || ::listen(listener.get(), 1) != 0 ||
        ::getsockname(listener.get(), reinterpret_cast<sockaddr *>(&a), &len) != 0)
        fail(DBRX_ERR_IO, "tcp_pair: cannot listen on localhost");
    OwnedFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(client.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) != 0) fail(DBRX_ERR_IO, "tcp_pair: connect");
    OwnedFd server(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (server.get() < 0) fail(DBRX_ERR_IO, "tcp_pair: accept");
    return {std::move(client), std::move(server)};
}

// A raw client socket connected to localhost:port, or an empty one (fd -1) when the connect fails:
// for tests that speak to a listener without the step protocol's own client.
inline OwnedFd connect_loopback(int32_t port) {
    OwnedFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd.get() < 0 || ::connect(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) != 0) return OwnedFd();
    return fd;
}

// Process 0's connections to `followers` processes and theirs to it, over the real listener.
struct StepGroup {
    std::vector<std::unique_ptr<dist::StepConnection>> leader_side;    // [r - 1]: to process r
    std::vector<std::unique_ptr<dist::StepConnection>> follower_side;  // [r - 1]: process r's
};
inline StepGroup step_group(int32_t followers) {
    using namespace std::chrono_literals;
    dist::StepChannelListener listener(0, followers + 1, 10s);
    std::vector<std::future<std::unique_ptr<dist::StepConnection>>> joins;
    for (int32_t r = 1; r <= followers; ++r)
        joins.push_back(std::async(std::launch::async, [r, followers, port = listener.port()] {
            return dist::connect_step_channel("127.0.0.1", port, r, followers + 1, 10s);
        }));
    StepGroup g;
    g.leader_side = listener.accept_all();
    for (auto &j : joins) g.follower_side.push_back(j.get());
    return g;
}

inline void expect_same_step(const dist::StepCommand &got, const dist::StepCommand &want) {
    EXPECT_EQ(got.summarized, want.summarized);
    ASSERT_EQ(got.seqs.size(), want.seqs.size());
    for (size_t i = 0; i < want.seqs.size(); ++i) {
        EXPECT_EQ(got.seqs[i].tokens, want.seqs[i].tokens) << "sequence " << i;
        EXPECT_EQ(got.seqs[i].pos0, want.seqs[i].pos0) << "sequence " << i;
        EXPECT_EQ(got.seqs[i].blocks, want.seqs[i].blocks) << "sequence " << i;
        EXPECT_EQ(got.seqs[i].want_logits, want.seqs[i].want_logits) << "sequence " << i;
    }
    ASSERT_EQ(got.needs.size(), want.needs.size());
    for (size_t i = 0; i < want.needs.size(); ++i) {
        EXPECT_EQ(got.needs[i].top_n, want.needs[i].top_n);
        EXPECT_EQ(got.needs[i].temperature, want.needs[i].temperature);
    }
}

// Records pools and steps. A step can be made to fail (fatal_token), or to wait like a rank stuck
// in a collective until abort() is called (hang_token).
class StepRecorder final : public Backend {
public:
    class Pool final : public KvPool {
    public:
        Pool(StepRecorder &owner, int32_t n, int32_t bs) : owner_(owner), n_(n), bs_(bs) {}
        ~Pool() override {
            std::lock_guard<std::mutex> lock(owner_.mutex_);
            ++owner_.pools_freed;
        }
        int32_t n_blocks() const override { return n_; }
        int32_t block_size() const override { return bs_; }

    private:
        StepRecorder &owner_;
        int32_t n_, bs_;
    };

    std::string name() const override { return "recorder"; }
    int64_t kv_bytes_per_block(int32_t bs) const override { return bs; }
    int64_t kv_memory_available() const override { return memory; }
    std::unique_ptr<KvPool> create_kv_pool(int32_t n, int32_t bs) override {
        std::lock_guard<std::mutex> lock(mutex_);
        if (fail_pools) fail(DBRX_ERR_OUT_OF_MEMORY, "recorder: no room for " + std::to_string(n) + " blocks");
        pools.emplace_back(n, bs);
        return std::make_unique<Pool>(*this, n, bs);
    }
    void forward(KvPool &, std::span<const SeqStep> batch, float *logits) override {
        run(dist::StepCommand::from(0, batch, false, {}));
        int32_t rows = 0;
        for (const SeqStep &s : batch) rows += s.want_logits ? 1 : 0;
        if (rows > 0 && logits == nullptr) fail(DBRX_ERR_INTERNAL, "recorder: no logits buffer");
        for (int32_t i = 0; i < rows; ++i) logits[i] = static_cast<float>(i);
    }
    bool forward_summarized(KvPool &, std::span<const SeqStep> batch, std::span<const LogitsNeed> needs,
                            std::span<LogitsSummary>) override {
        run(dist::StepCommand::from(0, batch, true, needs));
        return summarizes;
    }
    void abort(const std::string &why) {
        std::lock_guard<std::mutex> lock(mutex_);
        aborts.push_back(why);
        cv_.notify_all();
    }
    std::vector<dist::StepCommand> recorded() {
        std::lock_guard<std::mutex> lock(mutex_);
        return steps;
    }
    size_t abort_count() {
        std::lock_guard<std::mutex> lock(mutex_);
        return aborts.size();
    }
    // Waits (bounded) for the first abort; its reason, or nothing.
    std::optional<std::string> wait_abort(std::chrono::milliseconds timeout) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (!cv_.wait_for(lock, timeout, [&] { return !aborts.empty(); })) return std::nullopt;
        return aborts.front();
    }

    int64_t memory = 1 << 20;
    bool fail_pools = false, summarizes = false;
    std::optional<int32_t> fatal_token, hang_token;
    std::vector<std::pair<int32_t, int32_t>> pools;  // (n_blocks, block_size) created
    int32_t pools_freed = 0;
    std::vector<dist::StepCommand> steps;
    std::vector<std::string> aborts;

private:
    void run(dist::StepCommand c) {
        std::unique_lock<std::mutex> lock(mutex_);
        steps.push_back(c);
        for (const auto &s : c.seqs)
            for (int32_t t : s.tokens) {
                if (fatal_token && t == *fatal_token) fail(DBRX_ERR_ENGINE_DEAD, "recorder: injected rank failure");
                if (hang_token && t == *hang_token) {
                    // A collective waiting for a peer: only an abort (or the 10 s bound) ends it.
                    cv_.wait_for(lock, std::chrono::seconds(10), [&] { return !aborts.empty(); });
                    fail(DBRX_ERR_ENGINE_DEAD, "recorder: collective aborted: " +
                                                   (aborts.empty() ? std::string("timed out") : aborts.front()));
                }
            }
    }
    std::mutex mutex_;
    std::condition_variable cv_;
};

}  // namespace dbrx::testing
