// The TCP rendezvous that hands NCCL's unique id from process 0 to the others, exercised with
// threads on localhost: delivery, peers that start before process 0, a rank that never shows up,
// duplicate ranks, and the launcher environment variables.
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dist/tcp_rendezvous.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

std::vector<uint8_t> test_blob() {
    std::vector<uint8_t> b(128);
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 7 + 3);
    return b;
}

// A port nothing listens on (bound to find it, then released).
int32_t free_port() {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr *>(&a), &len);
    ::close(fd);
    return ntohs(a.sin_port);
}

struct PeerResult {
    std::vector<uint8_t> blob;
    std::optional<dbrx_status> status;
    std::string message;
    std::chrono::milliseconds elapsed{0};
};

// Runs rendezvous_receive for `rank` on a thread, recording what happened.
std::thread peer(PeerResult &out, int32_t port, int32_t rank, int32_t world, std::chrono::milliseconds timeout) {
    return std::thread([&out, port, rank, world, timeout] {
        const auto start = Clock::now();
        try {
            out.blob = rendezvous_receive({"127.0.0.1", port, rank, world, timeout});
        } catch (const Error &e) {
            out.status = e.status();
            out.message = e.what();
        }
        out.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
    });
}

bool contains(const std::string &s, const std::string &needle) { return s.find(needle) != std::string::npos; }

TEST(DistRendezvous, EveryRankReceivesTheBlob) {
    RendezvousServer server(0, 4, 10s);
    ASSERT_GT(server.port(), 0);
    std::vector<PeerResult> results(4);
    std::vector<std::thread> threads;
    for (int32_t r = 1; r < 4; ++r) threads.push_back(peer(results[r], server.port(), r, 4, 10s));
    server.broadcast(test_blob());
    for (auto &t : threads) t.join();
    for (int32_t r = 1; r < 4; ++r) {
        EXPECT_FALSE(results[r].status) << results[r].message;
        EXPECT_EQ(results[r].blob, test_blob()) << "rank " << r;
    }
}

TEST(DistRendezvous, PeersStartingFirstRetryUntilProcessZeroListens) {
    const int32_t port = free_port();
    std::vector<PeerResult> results(3);
    std::vector<std::thread> threads;
    for (int32_t r = 1; r < 3; ++r) threads.push_back(peer(results[r], port, r, 3, 10s));
    std::this_thread::sleep_for(400ms);  // the peers are being refused meanwhile
    RendezvousConfig cfg{"127.0.0.1", port, 0, 3, 10s};
    EXPECT_EQ(rendezvous_exchange(cfg, test_blob()), test_blob());
    for (auto &t : threads) t.join();
    for (int32_t r = 1; r < 3; ++r) EXPECT_EQ(results[r].blob, test_blob()) << results[r].message;
}

TEST(DistRendezvous, MissingRankFailsEveryoneWithinTheTimeout) {
    RendezvousServer server(0, 3, 700ms);
    PeerResult one;
    std::thread t = peer(one, server.port(), 1, 3, 5s);
    const auto start = Clock::now();
    try {
        server.broadcast(test_blob());
        ADD_FAILURE() << "broadcast succeeded without rank 2";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_TIMEOUT);
        EXPECT_TRUE(contains(e.what(), "rank(s) 2 never connected")) << e.what();
    }
    EXPECT_LT(Clock::now() - start, 1500ms);
    t.join();
    ASSERT_TRUE(one.status);
    EXPECT_EQ(*one.status, DBRX_ERR_TIMEOUT);
    EXPECT_TRUE(contains(one.message, "rank(s) 2 never connected")) << one.message;
    EXPECT_LT(one.elapsed, 1500ms);
}

TEST(DistRendezvous, NoProcessZeroIsATimeoutNamingTheAddress) {
    const int32_t port = free_port();
    PeerResult r;
    std::thread t = peer(r, port, 1, 2, 600ms);
    t.join();
    ASSERT_TRUE(r.status);
    EXPECT_EQ(*r.status, DBRX_ERR_TIMEOUT);
    EXPECT_TRUE(contains(r.message, "127.0.0.1:" + std::to_string(port))) << r.message;
    EXPECT_TRUE(contains(r.message, "could not connect")) << r.message;
    EXPECT_GE(r.elapsed, 550ms);
    EXPECT_LT(r.elapsed, 2000ms);
}

TEST(DistRendezvous, DuplicateRankOrWrongWorldSizeIsRefused) {
    {
        RendezvousServer server(0, 3, 5s);
        std::vector<PeerResult> results(2);
        std::thread a = peer(results[0], server.port(), 1, 3, 5s);
        std::thread b = peer(results[1], server.port(), 1, 3, 5s);
        EXPECT_THROW(server.broadcast(test_blob()), Error);
        a.join();
        b.join();
        for (auto &r : results) {
            ASSERT_TRUE(r.status);
            EXPECT_EQ(*r.status, DBRX_ERR_INVALID_ARGUMENT);
            EXPECT_TRUE(contains(r.message, "two processes claim rank 1")) << r.message;
        }
    }
    RendezvousServer server(0, 2, 5s);
    PeerResult r;
    std::thread t = peer(r, server.port(), 1, 4, 5s);
    EXPECT_THROW(server.broadcast(test_blob()), Error);
    t.join();
    ASSERT_TRUE(r.status);
    EXPECT_TRUE(contains(r.message, "rank 1 says the world has 4 processes, process 0 says 2")) << r.message;
}

TEST(DistRendezvous, ResolvesLauncherEnvironment) {
    std::map<std::string, std::string> env;
    auto getenv_fn = [&](const char *name) -> const char * {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
    };
    // Nothing set: a single process needs no address.
    RendezvousConfig single = resolve_rendezvous({}, getenv_fn);
    EXPECT_EQ(single.rank, 0);
    EXPECT_EQ(single.world_size, 1);

    env = {{"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29500"}, {"RANK", "2"}, {"WORLD_SIZE", "4"},
           {"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "16"}};
    RendezvousConfig c = resolve_rendezvous({}, getenv_fn);
    EXPECT_EQ(c.host, "node0");
    EXPECT_EQ(c.port, 29500);
    EXPECT_EQ(c.rank, 2);
    EXPECT_EQ(c.world_size, 4);
    // Explicit settings win over the environment.
    RendezvousConfig given{"10.0.0.1", 1234, 1, 2};
    c = resolve_rendezvous(given, getenv_fn);
    EXPECT_EQ(c.host, "10.0.0.1");
    EXPECT_EQ(c.port, 1234);
    EXPECT_EQ(c.rank, 1);
    // SLURM when torchrun's variables are absent.
    env.erase("RANK");
    env.erase("WORLD_SIZE");
    c = resolve_rendezvous({}, getenv_fn);
    EXPECT_EQ(c.rank, 9);
    EXPECT_EQ(c.world_size, 16);

    auto expect_invalid = [&](const std::string &needle) {
        try {
            resolve_rendezvous({}, getenv_fn);
            ADD_FAILURE() << "accepted; expected an error mentioning " << needle;
        } catch (const Error &e) {
            EXPECT_EQ(e.status(), DBRX_ERR_INVALID_ARGUMENT);
            EXPECT_TRUE(contains(e.what(), needle)) << e.what();
        }
    };
    env = {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "29500"}};
    expect_invalid("MASTER_ADDR");
    env = {{"RANK", "x1"}, {"WORLD_SIZE", "2"}};
    expect_invalid("RANK='x1'");
    env = {{"RANK", "3"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}};
    expect_invalid("rank 3 outside");
    env = {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}};
    expect_invalid("port");
    env = {{"RANK", "1"}};
    expect_invalid("WORLD_SIZE is not");
}

}  // namespace
}  // namespace dbrx::dist
