#include "dist/step_channel.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "util/error.h"

namespace dbrx::dist {
namespace {

using Clock = std::chrono::steady_clock;

std::string num(int64_t v) { return std::to_string(v); }

int remaining_ms(Clock::time_point deadline) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    return static_cast<int>(std::clamp<int64_t>(ms, 0, 1 << 30));
}

// Waits for `events` on fd until the deadline; false on timeout.
bool wait_for(int fd, short events, Clock::time_point deadline) {
    for (;;) {
        pollfd p{fd, events, 0};
        const int rc = ::poll(&p, 1, remaining_ms(deadline));
        if (rc > 0) return true;
        if (rc == 0) return false;
        if (errno != EINTR) return true;  // let the read or write report the error
    }
}

enum class ReadResult { Ok, Timeout, Closed };

// got: bytes read so far (to tell a clean close before a frame from one inside it).
ReadResult read_all(int fd, uint8_t *p, size_t n, Clock::time_point deadline, size_t &got) {
    got = 0;
    while (got < n) {
        if (!wait_for(fd, POLLIN, deadline)) return ReadResult::Timeout;
        const ssize_t r = ::recv(fd, p + got, n - got, MSG_DONTWAIT);
        if (r > 0) {
            got += static_cast<size_t>(r);
        } else if (r == 0) {
            return ReadResult::Closed;
        } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
            return ReadResult::Closed;
        }
    }
    return ReadResult::Ok;
}

void set_nodelay(int fd) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // steps are small and latency-bound
}

// A bound, listening socket on all interfaces (dual-stack when the host has IPv6).
int listen_on(int32_t port, int32_t backlog) {
    int one = 1, zero = 0;
    int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        sockaddr_in6 a{};
        a.sin6_family = AF_INET6;
        a.sin6_addr = in6addr_any;
        a.sin6_port = htons(static_cast<uint16_t>(port));
        if (::bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) != 0) {
            ::close(fd);
            fd = -1;
        }
    }
    if (fd < 0) {
        fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) fail(DBRX_ERR_IO, std::string("step channel: socket: ") + std::strerror(errno));
        ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        a.sin_port = htons(static_cast<uint16_t>(port));
        if (::bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) != 0) {
            const int err = errno;
            ::close(fd);
            fail(DBRX_ERR_IO, "step channel: process 0 cannot listen on port " + num(port) + ": " + std::strerror(err));
        }
    }
    if (::listen(fd, std::max(1, backlog)) != 0) {
        const int err = errno;
        ::close(fd);
        fail(DBRX_ERR_IO, "step channel: listen on port " + num(port) + ": " + std::strerror(err));
    }
    return fd;
}

}  // namespace

StepConnection::StepConnection(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) { set_nodelay(fd_); }

StepConnection::~StepConnection() {
    if (fd_ >= 0) ::close(fd_);
}

void StepConnection::shutdown() noexcept { ::shutdown(fd_, SHUT_RDWR); }

void StepConnection::send(StepMsg type, std::span<const uint8_t> payload, std::chrono::milliseconds timeout) {
    std::lock_guard<std::mutex> lock(send_mutex_);
    StepFrameHeader h;
    h.type = type;
    h.seq = send_seq_;
    h.payload_bytes = static_cast<uint32_t>(std::min<size_t>(payload.size(), UINT32_MAX));
    if (payload.size() > kMaxStepPayload)
        invalid_argument("step channel to " + peer_ + ": a " + step_msg_name(type) + " of " + num(payload.size()) +
                         " bytes exceeds the limit of " + num(kMaxStepPayload));
    const std::vector<uint8_t> head = encode_step_header(h);
    const auto deadline = Clock::now() + timeout;
    for (std::span<const uint8_t> part : {std::span<const uint8_t>(head), payload}) {
        size_t done = 0;
        while (done < part.size()) {
            if (!wait_for(fd_, POLLOUT, deadline))
                fail(DBRX_ERR_TIMEOUT, "step channel: " + peer_ + " took no data for " + num(timeout.count()) +
                                           " ms while sending a " + step_msg_name(type) + " (is it stuck?)");
            const ssize_t w = ::send(fd_, part.data() + done, part.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0) {
                done += static_cast<size_t>(w);
            } else if (w < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
                fail(DBRX_ERR_IO, "step channel: connection to " + peer_ + " broken while sending a " +
                                      step_msg_name(type) + ": " + std::strerror(errno));
            }
        }
    }
    ++send_seq_;
}

StepFrame StepConnection::receive(std::chrono::milliseconds timeout) {
    uint8_t head[kStepHeaderBytes];
    size_t got = 0;
    switch (read_all(fd_, head, sizeof head, Clock::now() + timeout, got)) {
        case ReadResult::Ok: break;
        case ReadResult::Timeout:
            if (got == 0)
                fail(DBRX_ERR_TIMEOUT, "step channel: nothing from " + peer_ + " in " + num(timeout.count()) + " ms");
            fail(DBRX_ERR_IO, "step channel: " + peer_ + " stopped after " + num(got) + " bytes of a frame header");
        case ReadResult::Closed:
            if (got == 0) fail(DBRX_ERR_ENGINE_DEAD, "step channel: " + peer_ + " closed the connection");
            fail(DBRX_ERR_IO, "step channel: " + peer_ + " closed the connection inside a frame header");
    }
    const StepFrameHeader h = decode_step_header(head);
    if (h.seq != recv_seq_)
        fail(DBRX_ERR_IO, "step channel: frame " + num(static_cast<int64_t>(h.seq)) + " from " + peer_ +
                              " where frame " + num(static_cast<int64_t>(recv_seq_)) + " was due (lost or repeated)");
    StepFrame f;
    f.type = h.type;
    f.payload.resize(h.payload_bytes);
    switch (read_all(fd_, f.payload.data(), f.payload.size(), Clock::now() + timeout, got)) {
        case ReadResult::Ok: break;
        case ReadResult::Timeout:
            fail(DBRX_ERR_IO, "step channel: " + peer_ + " sent " + num(got) + " of the " + num(h.payload_bytes) +
                                  " bytes of a " + step_msg_name(h.type) + ", then nothing for " +
                                  num(timeout.count()) + " ms");
        case ReadResult::Closed:
            fail(DBRX_ERR_IO, "step channel: " + peer_ + " closed the connection after " + num(got) + " of the " +
                                  num(h.payload_bytes) + " bytes of a " + step_msg_name(h.type));
    }
    ++recv_seq_;
    return f;
}

StepChannelListener::StepChannelListener(int32_t port, int32_t world_size, std::chrono::milliseconds timeout)
    : world_size_(world_size), timeout_(timeout) {
    if (port < 0 || port > 65535) invalid_argument("step channel: port " + num(port) + " outside [0, 65535]");
    if (world_size < 2) invalid_argument("step channel: a group of " + num(world_size) + " process(es) needs none");
    fd_ = listen_on(port, std::min(world_size, 1024));
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    ::getsockname(fd_, reinterpret_cast<sockaddr *>(&bound), &len);
    port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6 *>(&bound)->sin6_port
                                              : reinterpret_cast<sockaddr_in *>(&bound)->sin_port);
}

StepChannelListener::~StepChannelListener() {
    if (fd_ >= 0) ::close(fd_);
}

std::vector<std::unique_ptr<StepConnection>> StepChannelListener::accept_all() {
    if (fd_ < 0) fail(DBRX_ERR_INTERNAL, "step channel: accept_all called twice");
    const auto deadline = Clock::now() + timeout_;
    const std::string where = "step channel on port " + num(port_) + ": ";
    std::vector<std::unique_ptr<StepConnection>> peers(static_cast<size_t>(world_size_ - 1));
    auto refuse_all = [&](dbrx_status status, const std::string &why, StepConnection *offender) {
        const std::vector<uint8_t> reply = encode(StepReply{status, 0, where + why});
        for (auto &p : peers)
            if (p) try { p->send(StepMsg::Welcome, reply, std::chrono::seconds(2)); } catch (const Error &) {}
        if (offender) try { offender->send(StepMsg::Welcome, reply, std::chrono::seconds(2)); } catch (const Error &) {}
        fail(status, where + why);
    };
    int32_t missing = world_size_ - 1;
    while (missing > 0) {
        if (!wait_for(fd_, POLLIN, deadline)) {
            std::string who;
            for (int32_t r = 1; r < world_size_; ++r)
                if (!peers[r - 1]) who += (who.empty() ? "" : ", ") + num(r);
            refuse_all(DBRX_ERR_TIMEOUT, "process 0 waited " + num(timeout_.count()) + " ms; process(es) " + who +
                                             " never connected", nullptr);
        }
        sockaddr_storage from{};
        socklen_t len = sizeof from;
        const int fd = ::accept4(fd_, reinterpret_cast<sockaddr *>(&from), &len, SOCK_CLOEXEC);
        if (fd < 0) continue;
        char host[NI_MAXHOST] = "?";
        ::getnameinfo(reinterpret_cast<sockaddr *>(&from), len, host, sizeof host, nullptr, 0, NI_NUMERICHOST);
        if (std::strncmp(host, "::ffff:", 7) == 0) std::memmove(host, host + 7, std::strlen(host + 7) + 1);  // IPv4
        auto conn = std::make_unique<StepConnection>(fd, std::string("a peer at ") + host);
        StepHello hello;
        try {
            // A stray connection (a port scan, a health check) gets a short while to say hello.
            StepFrame f = conn->receive(std::min(std::chrono::milliseconds(2000),
                                                 std::chrono::milliseconds(remaining_ms(deadline) + 1)));
            if (f.type != StepMsg::Hello) continue;
            hello = decode_hello(f.payload);
        } catch (const Error &e) {
            // One of ours from another build: the group cannot work, and both sides should say why.
            if (std::string(e.what()).find("speaks step protocol version") != std::string::npos)
                refuse_all(DBRX_ERR_INVALID_ARGUMENT, e.what(), conn.get());
            continue;  // not one of ours (a port scan, a health check): drop it
        }
        if (hello.world_size != world_size_)
            refuse_all(DBRX_ERR_INVALID_ARGUMENT, "process " + num(hello.rank) + " says the group has " +
                                                      num(hello.world_size) + " processes, process 0 says " +
                                                      num(world_size_), conn.get());
        if (hello.rank < 1 || hello.rank >= world_size_)
            refuse_all(DBRX_ERR_INVALID_ARGUMENT, "a peer claims process rank " + num(hello.rank) + " outside [1, " +
                                                      num(world_size_) + ")", conn.get());
        if (peers[hello.rank - 1])
            refuse_all(DBRX_ERR_INVALID_ARGUMENT, "two processes claim rank " + num(hello.rank), conn.get());
        conn->set_peer("process " + num(hello.rank) + " (" + host + ")");
        peers[hello.rank - 1] = std::move(conn);
        --missing;
    }
    // Close the listener before anyone hears back, so NCCL's rendezvous may bind the port at once.
    ::close(fd_);
    fd_ = -1;
    const std::vector<uint8_t> ok = encode(StepReply{DBRX_OK, 0, ""});
    for (auto &p : peers) p->send(StepMsg::Welcome, ok, timeout_);
    return peers;
}

std::unique_ptr<StepConnection> connect_step_channel(const std::string &host, int32_t port, int32_t rank,
                                                     int32_t world_size, std::chrono::milliseconds timeout) {
    const std::string where = "step channel: process " + num(rank) + " to process 0 at " + host + ":" + num(port);
    const auto deadline = Clock::now() + timeout;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    std::string last_error = "no attempt";
    for (;;) {
        addrinfo *raw = nullptr;
        const int rc = ::getaddrinfo(host.c_str(), num(port).c_str(), &hints, &raw);
        std::unique_ptr<addrinfo, void (*)(addrinfo *)> list(rc == 0 ? raw : nullptr, [](addrinfo *a) {
            if (a) ::freeaddrinfo(a);
        });
        if (rc != 0) last_error = std::string("cannot resolve: ") + ::gai_strerror(rc);
        for (addrinfo *a = list.get(); a; a = a->ai_next) {
            const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
            if (fd < 0) continue;
            auto conn = std::make_unique<StepConnection>(fd, "process 0 (" + host + ":" + num(port) + ")");
            if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
                last_error = std::strerror(errno);
                continue;
            }
            int err = ETIMEDOUT;
            socklen_t len = sizeof err;
            if (wait_for(fd, POLLOUT, std::min(deadline, Clock::now() + std::chrono::seconds(1))))
                ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err != 0) {
                last_error = std::strerror(err);
                continue;
            }
            StepReply reply;
            try {
                conn->send(StepMsg::Hello, encode(StepHello{rank, world_size}),
                           std::chrono::milliseconds(remaining_ms(deadline) + 1));
                // Process 0 answers once every process has said hello.
                StepFrame f = conn->receive(std::chrono::milliseconds(remaining_ms(deadline) + 1));
                if (f.type != StepMsg::Welcome)
                    fail(DBRX_ERR_IO, std::string("expected a Welcome, got a ") + step_msg_name(f.type));
                reply = decode_reply(f.payload);
            } catch (const Error &e) {
                last_error = e.what();  // e.g. something else answered on that port: try again
                continue;
            }
            if (reply.status != DBRX_OK) fail(reply.status, where + " refused: " + reply.message);
            return conn;
        }
        if (remaining_ms(deadline) == 0)
            fail(DBRX_ERR_TIMEOUT, where + ": no welcome within " + num(timeout.count()) + " ms (last error: " +
                                       last_error + ")");
        std::this_thread::sleep_for(std::min(std::chrono::milliseconds(100),
                                             std::chrono::milliseconds(remaining_ms(deadline))));
    }
}

}  // namespace dbrx::dist
