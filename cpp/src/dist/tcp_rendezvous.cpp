#include "dist/tcp_rendezvous.h"
#include "dist/unique_fd.h"

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
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <thread>

#include "util/error.h"

namespace dbrx::dist {
namespace {

using Clock = std::chrono::steady_clock;
constexpr char kMagic[8] = {'D', 'B', 'R', 'X', 'R', 'D', 'V', '1'};
constexpr uint32_t kMaxBlob = 1u << 20;
// How long process 0 gives an accepted connection to say who it is before treating it as a stray.
constexpr auto kHelloTimeout = std::chrono::seconds(2);

std::string num(int64_t v) { return std::to_string(v); }

using Fd = UniqueFd;

int remaining_ms(Clock::time_point deadline) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    return static_cast<int>(std::clamp<int64_t>(ms, 0, 1 << 30));
}

// False on timeout or a closed/failed connection.
bool recv_all(int fd, void *buf, size_t n, Clock::time_point deadline) {
    auto *p = static_cast<uint8_t *>(buf);
    while (n > 0) {
        pollfd pfd{fd, POLLIN, 0};
        int wait = remaining_ms(deadline);
        if (wait == 0 || ::poll(&pfd, 1, wait) <= 0) return false;
        ssize_t got = ::recv(fd, p, n, 0);
        if (got <= 0) {
            if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            return false;
        }
        p += got;
        n -= static_cast<size_t>(got);
    }
    return true;
}

bool send_all(int fd, const void *buf, size_t n) {
    const auto *p = static_cast<const uint8_t *>(buf);
    while (n > 0) {
        ssize_t sent = ::send(fd, p, n, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) continue;
        if (sent <= 0) return false;
        p += sent;
        n -= static_cast<size_t>(sent);
    }
    return true;
}

void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t{p[i]} << (8 * i);
    return v;
}

// Reply: status (a dbrx_status; 0 = ok), payload length, payload (the blob, or an error message).
bool send_reply(int fd, uint32_t status, std::span<const uint8_t> payload) {
    uint8_t head[8];
    put_u32(head, status);
    put_u32(head + 4, static_cast<uint32_t>(payload.size()));
    return send_all(fd, head, 8) && send_all(fd, payload.data(), payload.size());
}

std::optional<int64_t> parse_int(const char *s) {
    if (!s || !*s) return std::nullopt;
    int64_t v = 0;
    const char *end = s + std::strlen(s);
    auto [ptr, ec] = std::from_chars(s, end, v);
    if (ec != std::errc() || ptr != end) return std::nullopt;
    return v;
}

}  // namespace

RendezvousConfig resolve_rendezvous(RendezvousConfig c, const std::function<const char *(const char *)> &getenv_fn) {
    auto env = [&](const char *name) -> const char * { return getenv_fn ? getenv_fn(name) : std::getenv(name); };
    auto env_int = [&](const char *name) -> std::optional<int64_t> {
        const char *v = env(name);
        if (!v) return std::nullopt;
        auto parsed = parse_int(v);
        if (!parsed) invalid_argument(std::string("rendezvous: environment variable ") + name + "='" + v +
                                      "' is not an integer");
        return parsed;
    };
    if (c.rank < 0 || c.world_size < 0) {
        // The first launcher whose variables are set provides both values.
        const std::pair<const char *, const char *> launchers[] = {{"RANK", "WORLD_SIZE"},
                                                                   {"SLURM_PROCID", "SLURM_NTASKS"},
                                                                   {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
                                                                   {"PMI_RANK", "PMI_SIZE"}};
        bool found = false;
        for (auto [rank_var, size_var] : launchers) {
            auto rank = env_int(rank_var);
            if (!rank) continue;
            auto size = env_int(size_var);
            if (!size) invalid_argument(std::string("rendezvous: ") + rank_var + " is set but " + size_var + " is not");
            if (c.rank < 0) c.rank = static_cast<int32_t>(*rank);
            if (c.world_size < 0) c.world_size = static_cast<int32_t>(*size);
            found = true;
            break;
        }
        if (!found) {
            if (c.world_size > 1) invalid_argument("rendezvous: world size " + num(c.world_size) +
                                                   " but no rank given and none of RANK, SLURM_PROCID, "
                                                   "OMPI_COMM_WORLD_RANK, PMI_RANK is set");
            c.rank = std::max(c.rank, 0);
            c.world_size = std::max(c.world_size, 1);
        }
    }
    if (c.world_size < 1 || c.rank < 0 || c.rank >= c.world_size)
        invalid_argument("rendezvous: rank " + num(c.rank) + " outside [0, world size " + num(c.world_size) + ")");
    if (c.timeout.count() <= 0) invalid_argument("rendezvous: timeout must be positive");
    if (c.world_size == 1) return c;
    if (c.host.empty()) {
        const char *addr = env("MASTER_ADDR");
        if (!addr || !*addr) invalid_argument("rendezvous: no address of process 0 given and MASTER_ADDR is not set");
        c.host = addr;
    }
    if (c.port < 0) {
        auto port = env_int("MASTER_PORT");
        if (!port) invalid_argument("rendezvous: no port given and MASTER_PORT is not set");
        c.port = static_cast<int32_t>(std::clamp<int64_t>(*port, -1, 65536));
    }
    if (c.port > 65535 || c.port < 0 || (c.port == 0 && c.rank != 0))
        invalid_argument("rendezvous: port " + num(c.port) + " outside [1, 65535]");
    return c;
}

RendezvousServer::RendezvousServer(int32_t port, int32_t world_size, std::chrono::milliseconds timeout)
    : world_size_(world_size), timeout_(timeout) {
    if (port < 0 || port > 65535) invalid_argument("rendezvous: port " + num(port) + " outside [0, 65535]");
    if (world_size < 1) invalid_argument("rendezvous: world size " + num(world_size) + " must be >= 1");
    // Dual-stack on all interfaces, so peers may use any of this host's addresses.
    Fd fd(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int one = 1, zero = 0;
    if (fd.get() >= 0) {
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        sockaddr_in6 a{};
        a.sin6_family = AF_INET6;
        a.sin6_addr = in6addr_any;
        a.sin6_port = htons(static_cast<uint16_t>(port));
        if (::bind(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) != 0) fd.reset();
    }
    if (fd.get() < 0) {  // no IPv6 on this host
        fd = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (fd.get() < 0) fail(DBRX_ERR_IO, std::string("rendezvous: socket: ") + std::strerror(errno));
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        a.sin_port = htons(static_cast<uint16_t>(port));
        if (::bind(fd.get(), reinterpret_cast<sockaddr *>(&a), sizeof a) != 0)
            fail(DBRX_ERR_IO, "rendezvous: process 0 cannot listen on port " + num(port) + ": " + std::strerror(errno));
    }
    if (::listen(fd.get(), std::min(world_size, 1024)) != 0)
        fail(DBRX_ERR_IO, "rendezvous: listen on port " + num(port) + ": " + std::strerror(errno));
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    ::getsockname(fd.get(), reinterpret_cast<sockaddr *>(&bound), &len);
    port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6 *>(&bound)->sin6_port
                                              : reinterpret_cast<sockaddr_in *>(&bound)->sin_port);
    fd_ = fd.release();  // closed in the destructor
}

RendezvousServer::~RendezvousServer() {
    if (fd_ >= 0) ::close(fd_);
}

void RendezvousServer::broadcast(std::span<const uint8_t> blob) {
    if (blob.size() > kMaxBlob) invalid_argument("rendezvous: blob of " + num(blob.size()) + " bytes is too large");
    const auto deadline = Clock::now() + timeout_;
    std::vector<Fd> peers(static_cast<size_t>(world_size_));
    int32_t missing = world_size_ - 1;
    // Fails the rendezvous: every peer connected so far (and `offender`) learns why.
    auto fail_all = [&](dbrx_status status, const std::string &why, int offender) {
        const std::string msg = "rendezvous on port " + num(port_) + ": " + why;
        std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t *>(msg.data()), msg.size());
        for (auto &p : peers)
            if (p.get() >= 0) send_reply(p.get(), static_cast<uint32_t>(status), bytes);
        if (offender >= 0) send_reply(offender, static_cast<uint32_t>(status), bytes);
        fail(status, msg);
    };
    while (missing > 0) {
        pollfd pfd{fd_, POLLIN, 0};
        int wait = remaining_ms(deadline);
        if (wait == 0 || ::poll(&pfd, 1, wait) == 0) {
            std::string who;
            for (int32_t r = 1; r < world_size_; ++r)
                if (peers[r].get() < 0) who += (who.empty() ? "" : ", ") + num(r);
            fail_all(DBRX_ERR_TIMEOUT, "process 0 waited " + num(timeout_.count()) + " ms; rank(s) " + who +
                                           " never connected", -1);
        }
        Fd c(::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC));
        if (c.get() < 0) continue;
        uint8_t hello[16];
        if (!recv_all(c.get(), hello, sizeof hello, std::min(deadline, Clock::now() + kHelloTimeout)) ||
            std::memcmp(hello, kMagic, sizeof kMagic) != 0)
            continue;  // not one of ours (a port scanner, a health check): drop it
        const int32_t rank = static_cast<int32_t>(get_u32(hello + 8)), world = static_cast<int32_t>(get_u32(hello + 12));
        if (world != world_size_)
            fail_all(DBRX_ERR_INVALID_ARGUMENT, "rank " + num(rank) + " says the world has " + num(world) +
                                                    " processes, process 0 says " + num(world_size_), c.get());
        if (rank < 1 || rank >= world_size_)
            fail_all(DBRX_ERR_INVALID_ARGUMENT, "a peer claims rank " + num(rank) + " outside [1, " +
                                                    num(world_size_) + ")", c.get());
        if (peers[rank].get() >= 0)
            fail_all(DBRX_ERR_INVALID_ARGUMENT, "two processes claim rank " + num(rank), c.get());
        peers[rank] = std::move(c);
        --missing;
    }
    for (int32_t r = 1; r < world_size_; ++r)
        if (!send_reply(peers[r].get(), 0, blob))
            fail_all(DBRX_ERR_IO, "rank " + num(r) + " disconnected before receiving the id", -1);
}

std::vector<uint8_t> rendezvous_receive(const RendezvousConfig &c) {
    const std::string where = "rendezvous: rank " + num(c.rank) + " with process 0 at " + c.host + ":" + num(c.port);
    const auto deadline = Clock::now() + c.timeout;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    Fd conn;
    std::string last_error = "no attempt";
    while (conn.get() < 0) {
        addrinfo *list = nullptr;
        int rc = ::getaddrinfo(c.host.c_str(), num(c.port).c_str(), &hints, &list);
        if (rc != 0) {
            last_error = std::string("cannot resolve: ") + ::gai_strerror(rc);
        } else {
            for (addrinfo *a = list; a && conn.get() < 0; a = a->ai_next) {
                Fd s(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
                if (s.get() < 0) continue;
                if (::connect(s.get(), a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
                    last_error = std::strerror(errno);
                    continue;
                }
                pollfd pfd{s.get(), POLLOUT, 0};
                int err = ETIMEDOUT;
                socklen_t len = sizeof err;
                if (::poll(&pfd, 1, std::min(remaining_ms(deadline), 1000)) > 0)
                    ::getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len);
                if (err != 0) {
                    last_error = std::strerror(err);
                    continue;
                }
                ::fcntl(s.get(), F_SETFL, ::fcntl(s.get(), F_GETFL) & ~O_NONBLOCK);
                conn = std::move(s);
            }
            ::freeaddrinfo(list);
        }
        if (conn.get() >= 0) break;
        // Process 0 may not be up yet: retry until the deadline.
        if (remaining_ms(deadline) == 0)
            fail(DBRX_ERR_TIMEOUT, where + ": could not connect within " + num(c.timeout.count()) +
                                       " ms (last error: " + last_error + ")");
        std::this_thread::sleep_for(std::min(std::chrono::milliseconds(100),
                                             std::chrono::milliseconds(remaining_ms(deadline))));
    }
    uint8_t hello[16];
    std::memcpy(hello, kMagic, sizeof kMagic);
    put_u32(hello + 8, static_cast<uint32_t>(c.rank));
    put_u32(hello + 12, static_cast<uint32_t>(c.world_size));
    if (!send_all(conn.get(), hello, sizeof hello)) fail(DBRX_ERR_IO, where + ": connection lost while sending");
    uint8_t head[8];
    if (!recv_all(conn.get(), head, sizeof head, deadline))
        fail(DBRX_ERR_TIMEOUT, where + ": connected, but no reply within " + num(c.timeout.count()) +
                                   " ms (process 0 answers once every rank has connected)");
    const uint32_t status = get_u32(head), size = get_u32(head + 4);
    if (size > kMaxBlob) fail(DBRX_ERR_IO, where + ": reply of " + num(size) + " bytes is not a rendezvous reply");
    std::vector<uint8_t> payload(size);
    if (!recv_all(conn.get(), payload.data(), size, deadline)) fail(DBRX_ERR_IO, where + ": reply cut short");
    if (status != 0) {
        const auto s = static_cast<dbrx_status>(status);
        const bool known = s == DBRX_ERR_TIMEOUT || s == DBRX_ERR_INVALID_ARGUMENT || s == DBRX_ERR_IO;
        fail(known ? s : DBRX_ERR_IO, where + " failed: " + std::string(payload.begin(), payload.end()));
    }
    return payload;
}

std::vector<uint8_t> rendezvous_exchange(const RendezvousConfig &c, std::span<const uint8_t> blob) {
    if (c.world_size == 1) return {blob.begin(), blob.end()};
    if (c.rank != 0) return rendezvous_receive(c);
    RendezvousServer server(c.port, c.world_size, c.timeout);
    server.broadcast(blob);
    return {blob.begin(), blob.end()};
}

}  // namespace dbrx::dist
