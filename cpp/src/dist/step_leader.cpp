#include "dist/step_leader.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <climits>

#include "util/error.h"

namespace dbrx::dist {
namespace {

using Clock = std::chrono::steady_clock;

std::string num(int64_t v) { return std::to_string(v); }

// The pool the engine holds: the leader's local pool plus the id the followers know it by.
class LeaderKvPool final : public KvPool {
public:
    LeaderKvPool(LeaderBackend &owner, uint32_t id, std::unique_ptr<KvPool> inner)
        : owner_(owner), id_(id), inner_(std::move(inner)) {}
    ~LeaderKvPool() override { owner_.release_pool(id_); }
    int32_t n_blocks() const override { return inner_->n_blocks(); }
    int32_t block_size() const override { return inner_->block_size(); }
    uint32_t id() const { return id_; }
    KvPool &inner() { return *inner_; }

private:
    LeaderBackend &owner_;
    uint32_t id_;
    std::unique_ptr<KvPool> inner_;
};

}  // namespace

LeaderLink::LeaderLink(std::vector<std::unique_ptr<StepConnection>> followers, StepGroupOptions options)
    : conns_(std::move(followers)), options_(options), replies_(conns_.size()) {
    if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) fail(DBRX_ERR_IO, "step channel: cannot create a wake-up pipe");
    watcher_ = std::thread([this] { watch(); });
}

LeaderLink::~LeaderLink() {
    shutdown();
    for (int fd : wake_)
        if (fd >= 0) ::close(fd);
}

void LeaderLink::set_on_lost(std::function<void(const std::string &)> on_lost) {
    std::optional<std::string> already;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        on_lost_ = on_lost;
        already = lost_;
    }
    if (already && on_lost) on_lost(*already);
}

std::optional<std::string> LeaderLink::lost() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return lost_;
}

std::optional<std::string> LeaderLink::wait_lost(std::chrono::milliseconds timeout) const {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, timeout, [&] { return lost_.has_value() || closed_; });
    return lost_;
}

void LeaderLink::check_alive() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (lost_) fail(DBRX_ERR_ENGINE_DEAD, "multi-process group: " + *lost_);
    if (closed_) fail(DBRX_ERR_ENGINE_DEAD, "multi-process group: the step channel was shut down");
}

void LeaderLink::mark_lost(const std::string &reason) {
    std::function<void(const std::string &)> callback;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (lost_) return;
        lost_ = reason;
        callback = on_lost_;
    }
    cv_.notify_all();
    if (callback) callback(reason);
}

void LeaderLink::broadcast(StepMsg type, std::span<const uint8_t> payload) {
    check_alive();
    for (auto &c : conns_) {
        try {
            c->send(type, payload, options_.io_timeout);
        } catch (const Error &e) {
            mark_lost(e.what());
            fail(DBRX_ERR_ENGINE_DEAD, std::string("multi-process group: ") + e.what());
        }
    }
}

std::vector<StepReply> LeaderLink::collect_replies() {
    const auto deadline = Clock::now() + options_.io_timeout;
    std::unique_lock<std::mutex> lock(mutex_);
    std::vector<StepReply> out;
    for (size_t i = 0; i < conns_.size(); ++i) {
        if (!cv_.wait_until(lock, deadline, [&] { return lost_ || closed_ || !replies_[i].empty(); })) {
            const std::string why = conns_[i]->peer() + " did not answer within " +
                                    num(options_.io_timeout.count()) + " ms";
            lock.unlock();
            mark_lost(why);
            fail(DBRX_ERR_ENGINE_DEAD, "multi-process group: " + why);
        }
        if (lost_) fail(DBRX_ERR_ENGINE_DEAD, "multi-process group: " + *lost_);
        if (closed_) fail(DBRX_ERR_ENGINE_DEAD, "multi-process group: the step channel was shut down");
        out.push_back(std::move(replies_[i].front()));
        replies_[i].pop_front();
    }
    return out;
}

void LeaderLink::watch() {
    try {
        watch_loop();
    } catch (const std::exception &e) {
        mark_lost(std::string("the step channel's watcher failed: ") + e.what());
    }
}

void LeaderLink::watch_loop() {
    auto next_beat = Clock::now() + options_.heartbeat;
    std::vector<bool> gone(conns_.size(), false);
    for (;;) {
        std::vector<pollfd> fds;
        fds.push_back({wake_[0], POLLIN, 0});
        for (size_t i = 0; i < conns_.size(); ++i) fds.push_back({gone[i] ? -1 : conns_[i]->fd(), POLLIN, 0});
        const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_beat - Clock::now()).count();
        ::poll(fds.data(), fds.size(), static_cast<int>(std::clamp<int64_t>(wait, 0, INT_MAX)));
        if (fds[0].revents != 0) return;  // shutdown
        for (size_t i = 0; i < conns_.size(); ++i) {
            if (gone[i] || fds[i + 1].revents == 0) continue;
            StepConnection &c = *conns_[i];
            try {
                StepFrame f = c.receive(options_.io_timeout);
                if (f.type == StepMsg::Reply) {
                    StepReply r = decode_reply(f.payload);
                    std::lock_guard<std::mutex> lock(mutex_);
                    replies_[i].push_back(std::move(r));
                    cv_.notify_all();
                } else if (f.type == StepMsg::Failed) {
                    gone[i] = true;
                    mark_lost(c.peer() + " failed: " + decode_reply(f.payload).message);
                } else {
                    gone[i] = true;
                    mark_lost(c.peer() + " sent an unexpected " + step_msg_name(f.type));
                }
            } catch (const Error &e) {
                gone[i] = true;
                mark_lost(e.status() == DBRX_ERR_ENGINE_DEAD
                              ? c.peer() + " closed its step channel (the process exited or crashed)"
                              : std::string(e.what()));
            }
        }
        if (Clock::now() >= next_beat) {
            next_beat = Clock::now() + options_.heartbeat;
            for (size_t i = 0; i < conns_.size(); ++i) {
                if (gone[i]) continue;
                try {
                    conns_[i]->send(StepMsg::Heartbeat, {}, options_.io_timeout);
                } catch (const Error &e) {
                    gone[i] = true;
                    mark_lost(e.what());
                }
            }
        }
    }
}

void LeaderLink::close(const std::optional<std::string> &failure) noexcept {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (closed_) return;
        closed_ = true;
        if (failure && !lost_) lost_ = *failure;
    }
    cv_.notify_all();
    const char byte = 1;
    if (::write(wake_[1], &byte, 1) < 0) {
        // The pipe is non-blocking and empty: a write cannot fail here but for a closed fd.
    }
    if (watcher_.joinable()) watcher_.join();
    const bool healthy = !lost().has_value();
    for (auto &c : conns_) {
        try {
            const auto timeout = std::min(options_.io_timeout, std::chrono::milliseconds(5000));
            if (failure) {
                c->send(StepMsg::Failed, encode(StepReply{DBRX_ERR_ENGINE_DEAD, 0, *failure}), timeout);
            } else if (healthy) {
                c->send(StepMsg::Shutdown, {}, timeout);
            }
        } catch (const std::exception &) {
            // Gone already: it finds out through its own closed connection.
        }
        c->shutdown();
    }
}

LeaderBackend::LeaderBackend(std::unique_ptr<Backend> inner, std::function<void(const std::string &)> abort_inner,
                             std::shared_ptr<LeaderLink> link)
    : inner_(std::move(inner)), link_(std::move(link)) {
    if (!inner_ || !link_) invalid_argument("LeaderBackend: no inner backend or no link");
    if (abort_inner)
        link_->set_on_lost([abort_inner](const std::string &why) { abort_inner("multi-process group: " + why); });
}

LeaderBackend::~LeaderBackend() {
    link_->shutdown();
    inner_.reset();
}

std::string LeaderBackend::name() const {
    return inner_->name() + " leading " + num(link_->followers()) + " more process(es)";
}

int64_t LeaderBackend::kv_memory_available() const {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t least = inner_->kv_memory_available();
    link_->broadcast(StepMsg::Query, encode_u32(static_cast<uint32_t>(StepQuery::KvMemoryAvailable)));
    const std::vector<StepReply> replies = link_->collect_replies();
    for (size_t i = 0; i < replies.size(); ++i) {
        if (replies[i].status != DBRX_OK)
            fail(replies[i].status, "process " + num(static_cast<int64_t>(i) + 1) + ": " + replies[i].message);
        least = std::min(least, replies[i].value);
    }
    return least;
}

std::unique_ptr<KvPool> LeaderBackend::create_kv_pool(int32_t n_blocks, int32_t block_size) {
    std::lock_guard<std::mutex> lock(mutex_);
    const uint32_t id = next_pool_++;
    link_->broadcast(StepMsg::CreatePool, encode(StepPoolCommand{id, n_blocks, block_size}));
    // The followers allocate meanwhile; every reply is read before anything is thrown, so the
    // replies of the next request are never taken for this one's.
    std::unique_ptr<KvPool> local;
    std::string local_error;
    dbrx_status local_status = DBRX_OK;
    try {
        local = inner_->create_kv_pool(n_blocks, block_size);
    } catch (const Error &e) {
        local_status = e.status();
        local_error = e.what();
    }
    const std::vector<StepReply> replies = link_->collect_replies();
    for (size_t i = 0; i < replies.size() && local_status == DBRX_OK; ++i)
        if (replies[i].status != DBRX_OK) {
            local_status = replies[i].status;
            local_error = "process " + num(static_cast<int64_t>(i) + 1) + ": " + replies[i].message;
        }
    if (local_status != DBRX_OK) {
        link_->broadcast(StepMsg::DestroyPool, encode_u32(id));  // those that made it free it again
        fail(local_status, local_error);
    }
    return std::make_unique<LeaderKvPool>(*this, id, std::move(local));
}

void LeaderBackend::release_pool(uint32_t id) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    try {
        if (!link_->lost()) link_->broadcast(StepMsg::DestroyPool, encode_u32(id));
    } catch (const Error &) {
        // A lost follower frees everything when it stops.
    }
}

template <typename Run>
auto LeaderBackend::step(KvPool &pool, std::span<const SeqStep> batch, bool summarized,
                         std::span<const LogitsNeed> needs, Run &&run) {
    auto *lp = dynamic_cast<LeaderKvPool *>(&pool);
    if (!lp) invalid_argument(name() + ": the KV pool was not created by this backend");
    // What the followers would refuse to decode fails here, for this batch only.
    const auto rows = std::count_if(batch.begin(), batch.end(), [](const SeqStep &s) { return s.want_logits; });
    if (summarized && static_cast<size_t>(rows) != needs.size())
        invalid_argument(name() + ": " + num(static_cast<int64_t>(needs.size())) + " logits needs for " + num(rows) +
                         " output rows");
    link_->broadcast(StepMsg::Step, encode(StepCommand::from(lp->id(), batch, summarized, needs)));
    try {
        return run(lp->inner());
    } catch (const Error &e) {
        if (e.status() != DBRX_ERR_ENGINE_DEAD) throw;  // this batch only, on every process alike
        // NCCL may report a dead peer before the watcher has read its closed connection: give the
        // watcher a moment, so the error names the process that went away.
        const std::optional<std::string> lost = link_->wait_lost(std::chrono::seconds(1));
        // This process's ranks are dead: the followers must not wait for them in the collectives.
        link_->abandon(std::string("process 0's step failed: ") + e.what());
        if (lost) fail(DBRX_ERR_ENGINE_DEAD, std::string(e.what()) + " [multi-process group: " + *lost + "]");
        throw;
    }
}

void LeaderBackend::forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    step(pool, batch, false, {}, [&](KvPool &local) {
        inner_->forward(local, batch, logits);
        return true;
    });
}

bool LeaderBackend::forward_summarized(KvPool &pool, std::span<const SeqStep> batch, std::span<const LogitsNeed> needs,
                                       std::span<LogitsSummary> out) {
    std::lock_guard<std::mutex> lock(mutex_);
    // The followers mirror the call: when inner declines (returns false, having done nothing) so do they.
    return step(pool, batch, true, needs,
                [&](KvPool &local) { return inner_->forward_summarized(local, batch, needs, out); });
}

}  // namespace dbrx::dist
