#include "dist/step_follower.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "util/error.h"

namespace dbrx::dist {
namespace {

std::string num(int64_t v) { return std::to_string(v); }

// Watches the leader's connection for its close while the main loop is busy in a step (and so not
// reading): a step whose leader is gone can never finish, so its collectives are aborted at once
// rather than at their timeout. Peeks at nothing: POLLRDHUP reports the peer's FIN without reading.
class CloseWatch {
public:
    CloseWatch(int fd, std::function<void(const std::string &)> abort_group) : abort_(std::move(abort_group)) {
        if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) fail(DBRX_ERR_IO, "step follower: cannot create a pipe");
        thread_ = std::thread([this, fd] { run(fd); });
    }
    ~CloseWatch() {
        const char b = 1;
        if (::write(wake_[1], &b, 1) < 0) {
            // Non-blocking and empty: cannot fail but for a closed fd.
        }
        thread_.join();
        ::close(wake_[0]);
        ::close(wake_[1]);
    }
    // Marks a step running; if the leader is gone already, the step is aborted from the start.
    void begin_step() {
        std::lock_guard<std::mutex> lock(mutex_);
        in_step_ = true;
        if (closed_) abort("process 0 closed its step channel before this step could run");
    }
    void end_step() {
        std::lock_guard<std::mutex> lock(mutex_);
        in_step_ = false;
    }

private:
    void run(int fd) {
        pollfd fds[2] = {{wake_[0], POLLIN, 0}, {fd, POLLRDHUP, 0}};
        for (;;) {
            if (::poll(fds, 2, -1) < 0) continue;
            if (fds[0].revents != 0) return;
            if (fds[1].revents != 0) break;
        }
        std::lock_guard<std::mutex> lock(mutex_);
        closed_ = true;
        if (in_step_) abort("process 0 closed its step channel during a step (it exited or crashed)");
    }
    void abort(const std::string &why) {
        if (abort_) abort_(why);
    }

    std::function<void(const std::string &)> abort_;
    int wake_[2] = {-1, -1};
    std::mutex mutex_;
    bool in_step_ = false, closed_ = false;
    std::thread thread_;
};

}  // namespace

FollowerStats serve_follower(StepConnection &leader, Backend &backend, int32_t n_vocab,
                             const std::function<void(const std::string &)> &abort_group,
                             const StepGroupOptions &options) {
    if (n_vocab < 1) invalid_argument("serve_follower: n_vocab must be >= 1");
    FollowerStats stats;
    std::map<uint32_t, std::unique_ptr<KvPool>> pools;  // freed on every way out, before the backend
    std::vector<float> logits;
    std::vector<LogitsSummary> summaries;
    CloseWatch watch(leader.fd(), abort_group);
    // Stops this process: its collectives fail, process 0 learns why (best effort), and so does the caller.
    auto die = [&](const std::string &why, bool tell_leader) {
        if (abort_group) abort_group(why);
        if (tell_leader) {
            try {
                leader.send(StepMsg::Failed, encode(StepReply{DBRX_ERR_ENGINE_DEAD, 0, why}), std::chrono::seconds(5));
            } catch (const Error &) {
                // process 0 is gone too
            }
        }
        fail(DBRX_ERR_ENGINE_DEAD, "serving " + leader.peer() + ": " + why);
    };
    auto reply = [&](const StepReply &r) { leader.send(StepMsg::Reply, encode(r), options.io_timeout); };

    for (;;) {
        StepFrame f;
        try {
            f = leader.receive(options.idle_timeout);
        } catch (const Error &e) {
            if (e.status() == DBRX_ERR_TIMEOUT)
                die("nothing (not even a heartbeat) from process 0 for " + num(options.idle_timeout.count()) + " ms",
                    true);
            if (e.status() == DBRX_ERR_ENGINE_DEAD)
                die("process 0 closed its step channel without a shutdown (it exited or crashed)", false);
            die(e.what(), true);
        }
        try {
            switch (f.type) {
                case StepMsg::Heartbeat: break;
                case StepMsg::Shutdown: return stats;
                case StepMsg::Failed:  // process 0's own ranks died
                    die("process 0 failed: " + decode_reply(f.payload).message, false);
                    break;  // not reached: die throws
                case StepMsg::CreatePool: {
                    const StepPoolCommand c = decode_pool(f.payload);
                    if (pools.count(c.pool)) die("process 0 created pool " + num(c.pool) + " twice", true);
                    StepReply r;
                    try {
                        pools[c.pool] = backend.create_kv_pool(c.n_blocks, c.block_size);
                        ++stats.pools;
                    } catch (const Error &e) {
                        r = {e.status(), 0, e.what()};
                    }
                    reply(r);
                    break;
                }
                case StepMsg::DestroyPool:
                    pools.erase(decode_u32(f.payload, "DestroyPool"));  // unknown: its creation failed here
                    break;
                case StepMsg::Query: {
                    const uint32_t what = decode_u32(f.payload, "Query");
                    if (what == static_cast<uint32_t>(StepQuery::KvMemoryAvailable))
                        reply({DBRX_OK, backend.kv_memory_available(), ""});
                    else
                        reply({DBRX_ERR_INVALID_ARGUMENT, 0, "unknown query " + num(what)});
                    break;
                }
                case StepMsg::Step: {
                    const StepCommand c = decode_step(f.payload);
                    auto pool = pools.find(c.pool);
                    if (pool == pools.end()) die("a step on pool " + num(c.pool) + ", which process 0 never created", true);
                    const std::vector<SeqStep> batch = c.views();
                    const size_t rows = static_cast<size_t>(c.output_rows());
                    watch.begin_step();
                    try {
                        if (c.summarized) {
                            summaries.resize(rows);
                            backend.forward_summarized(*pool->second, batch, c.needs, summaries);
                        } else {
                            logits.resize(rows * static_cast<size_t>(n_vocab));
                            backend.forward(*pool->second, batch, logits.data());
                        }
                        watch.end_step();
                    } catch (const Error &e) {
                        watch.end_step();
                        // Anything but ENGINE_DEAD failed this batch only, before any collective, and
                        // failed the same way on process 0 (as its engine treats it).
                        if (e.status() != DBRX_ERR_ENGINE_DEAD) {
                            ++stats.failed_steps;
                            ++stats.steps;
                            break;
                        }
                        die("step " + num(stats.steps) + " failed here: " + e.what(), true);
                    }
                    ++stats.steps;
                    break;
                }
                default:
                    die(std::string("unexpected ") + step_msg_name(f.type) + " from process 0", true);
            }
        } catch (const Error &e) {
            if (e.status() == DBRX_ERR_ENGINE_DEAD) throw;  // die() already did the rest
            die(e.what(), true);                          // a bad frame or a reply that could not be sent
        } catch (const std::exception &e) {
            die(std::string("internal error: ") + e.what(), true);
        }
    }
}

}  // namespace dbrx::dist
