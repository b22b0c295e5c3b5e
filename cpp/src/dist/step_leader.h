// Process 0 of a multi-process group (the leader): runs the engine, and before each KV pool and
// each forward step sends the followers (dist/step_follower.h) the same command over the step
// channel, so every process enters the same collectives in the same order.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dist/step_channel.h"
#include "model/backend.h"

namespace dbrx::dist {

struct StepGroupOptions {
    // Longest a write may block, and longest the leader waits for a follower's reply (CreatePool, Query).
    std::chrono::milliseconds io_timeout{std::chrono::seconds(60)};
    // The leader sends a heartbeat this often, so a follower can tell a quiet leader from a dead one.
    std::chrono::milliseconds heartbeat{std::chrono::seconds(2)};
    // A follower gives up after this long without any frame (heartbeats included) from the leader.
    std::chrono::milliseconds idle_timeout{std::chrono::seconds(60)};
};

// The leader's connections to processes 1 .. P-1. A thread reads what the followers send (replies,
// failure reports) and sends heartbeats; a follower that closes its connection, reports a failure
// or breaks the protocol is lost: the first loss is recorded and on_lost runs once with the reason.
class LeaderLink {
public:
    LeaderLink(std::vector<std::unique_ptr<StepConnection>> followers, StepGroupOptions options);
    ~LeaderLink();  // shutdown()
    LeaderLink(const LeaderLink &) = delete;
    LeaderLink &operator=(const LeaderLink &) = delete;

    int32_t followers() const { return static_cast<int32_t>(conns_.size()); }
    const StepGroupOptions &options() const { return options_; }
    // Runs on the watcher thread at the first loss, or at once when a follower is already lost.
    void set_on_lost(std::function<void(const std::string &)> on_lost);
    std::optional<std::string> lost() const;
    // lost(), waiting up to `timeout` for a loss the watcher may not have read yet.
    std::optional<std::string> wait_lost(std::chrono::milliseconds timeout) const;
    // Throws DBRX_ERR_ENGINE_DEAD naming the lost follower, if any.
    void check_alive() const;
    // Sends one frame to every follower; a failed send loses that follower and throws ENGINE_DEAD.
    void broadcast(StepMsg type, std::span<const uint8_t> payload);
    // One reply per follower (in rank order) to the request just broadcast. Throws ENGINE_DEAD when
    // a follower is lost or does not answer within options().io_timeout.
    std::vector<StepReply> collect_replies();
    // Stops the watcher, tells the live followers to stop serving (Shutdown) and closes the
    // connections. Idempotent; later broadcasts fail.
    void shutdown() noexcept { close(std::nullopt); }
    // Process 0 failed (its own step died): tells the live followers why (Failed) instead of
    // Shutdown and closes, so a follower waiting in that step's collectives aborts at once.
    void abandon(const std::string &why) noexcept { close(why); }

private:
    void close(const std::optional<std::string> &failure) noexcept;
    void watch();
    void watch_loop();
    void mark_lost(const std::string &reason);

    std::vector<std::unique_ptr<StepConnection>> conns_;
    const StepGroupOptions options_;
    int wake_[2] = {-1, -1};
    mutable std::mutex mutex_;
    mutable std::condition_variable cv_;
    std::vector<std::deque<StepReply>> replies_;
    std::optional<std::string> lost_;
    std::function<void(const std::string &)> on_lost_;
    bool closed_ = false;
    std::thread watcher_;
};

// The leader's Backend: `inner` runs process 0's share of the ranks; create_kv_pool, forward and
// forward_summarized first send the command to the followers. kv_memory_available() is the least
// over all processes. abort_inner fails inner's collectives (ShardedCudaBackend::abort): it runs when
// a follower is lost, so a step waiting on a dead process fails at once instead of at the timeout.
// Destroying it sends Shutdown before destroying inner.
class LeaderBackend final : public Backend {
public:
    LeaderBackend(std::unique_ptr<Backend> inner, std::function<void(const std::string &)> abort_inner,
                  std::shared_ptr<LeaderLink> link);
    ~LeaderBackend() override;

    std::string name() const override;
    int64_t kv_bytes_per_block(int32_t block_size) const override { return inner_->kv_bytes_per_block(block_size); }
    int64_t kv_memory_available() const override;
    std::unique_ptr<KvPool> create_kv_pool(int32_t n_blocks, int32_t block_size) override;
    void forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) override;
    bool forward_summarized(KvPool &pool, std::span<const SeqStep> batch, std::span<const LogitsNeed> needs,
                            std::span<LogitsSummary> out) override;
    void fetch_logits_row(int32_t i, float *dst) override { inner_->fetch_logits_row(i, dst); }

    Backend &inner() { return *inner_; }
    void release_pool(uint32_t id) noexcept;  // by the leader's pools as they are destroyed

private:
    // Sends the step, then runs it locally; an ENGINE_DEAD names the lost follower when there is one.
    template <typename Run>
    auto step(KvPool &pool, std::span<const SeqStep> batch, bool summarized, std::span<const LogitsNeed> needs,
              Run &&run);

    std::unique_ptr<Backend> inner_;
    std::shared_ptr<LeaderLink> link_;
    mutable std::mutex mutex_;  // one command at a time: the followers run them in the order sent
    uint32_t next_pool_ = 1;
};

}  // namespace dbrx::dist
