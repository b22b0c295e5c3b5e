// The step channel: TCP connections from process 0 (the leader) to every other process of a
// multi-process group (the followers), carrying the frames of dist/step_wire.h. Process 0 listens on
// the rendezvous port before NCCL's own rendezvous (dist/tcp_rendezvous.h) binds it, and closes the
// listener once every follower said hello; the connections stay open for the model's life.
//
// Every read and write has a deadline: a peer that stops mid-frame, never answers or closes is a
// clear error (DBRX_ERR_TIMEOUT, DBRX_ERR_IO, or DBRX_ERR_ENGINE_DEAD for a clean close) naming it.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "dist/step_wire.h"

namespace dbrx::dist {

struct StepFrame {
    StepMsg type = StepMsg::Heartbeat;
    std::vector<uint8_t> payload;
};

// One framed connection. send() may be called from several threads (frames never interleave);
// receive() from one thread at a time.
class StepConnection {
public:
    StepConnection(int fd, std::string peer);  // takes ownership of fd
    ~StepConnection();
    StepConnection(const StepConnection &) = delete;
    StepConnection &operator=(const StepConnection &) = delete;

    const std::string &peer() const { return peer_; }
    void set_peer(std::string name) { peer_ = std::move(name); }  // before the connection is shared
    int fd() const { return fd_; }

    // Throws DBRX_ERR_TIMEOUT when the peer has not taken the frame within `timeout` (it stopped
    // reading), DBRX_ERR_IO when the connection is broken.
    void send(StepMsg type, std::span<const uint8_t> payload, std::chrono::milliseconds timeout);
    // Waits up to `timeout` for a frame to start and as long again for the rest of it. Throws
    // DBRX_ERR_TIMEOUT when nothing arrived, DBRX_ERR_ENGINE_DEAD when the peer closed the connection
    // between frames, DBRX_ERR_IO when it closed mid-frame or sent a bad or out-of-order frame.
    StepFrame receive(std::chrono::milliseconds timeout);
    // Wakes a blocked receive() (it then fails) and makes later sends fail; idempotent.
    void shutdown() noexcept;

private:
    int fd_;
    std::string peer_;
    std::mutex send_mutex_;
    uint64_t send_seq_ = 0, recv_seq_ = 0;
};

// Process 0's side. Binds at construction (port 0: any free port, see port()).
class StepChannelListener {
public:
    // Throws DBRX_ERR_IO naming the port when it cannot be bound.
    StepChannelListener(int32_t port, int32_t world_size, std::chrono::milliseconds timeout);
    ~StepChannelListener();
    StepChannelListener(const StepChannelListener &) = delete;
    StepChannelListener &operator=(const StepChannelListener &) = delete;
    int32_t port() const { return port_; }

    // Waits for processes 1 .. world_size - 1, closes the listener (so NCCL's rendezvous can bind the
    // port), then welcomes them all; result[r - 1] is process r. Connections that do not speak the
    // step protocol are dropped. Throws DBRX_ERR_TIMEOUT naming the processes that never came,
    // DBRX_ERR_INVALID_ARGUMENT for a duplicate rank or a mismatched world size (the offender and
    // those already connected are told why).
    std::vector<std::unique_ptr<StepConnection>> accept_all();

private:
    int fd_ = -1;
    int32_t port_ = 0, world_size_;
    std::chrono::milliseconds timeout_;
};

// A follower's side: connects to host:port (retrying until `timeout`: process 0 may start later),
// says hello and waits for the welcome. Throws DBRX_ERR_TIMEOUT naming the address, or the status
// and message with which process 0 refused the group.
std::unique_ptr<StepConnection> connect_step_channel(const std::string &host, int32_t port, int32_t rank,
                                                     int32_t world_size, std::chrono::milliseconds timeout);

}  // namespace dbrx::dist
