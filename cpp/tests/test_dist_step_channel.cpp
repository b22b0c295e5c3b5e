// The step channel of multi-process serving (dist/step_wire.h, step_channel.h, step_leader.h,
// step_follower.h): the wire format, the TCP connections with their deadlines, and the leader and
// follower over real localhost TCP with recording backends, so that what process 0 runs and what the
// others run can be compared step by step. GPUs play no part: the CUDA side is
// cuda/test_cuda_multiprocess.cpp.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <thread>

#include "dist/step_channel.h"
#include "dist/tcp_rendezvous.h"
#include "dist/step_wire.h"
#include "step_channel_test_util.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;
using dbrx::testing::expect_same_step;
using dbrx::testing::tcp_pair;
using Clock = std::chrono::steady_clock;

std::string error_of(const std::function<void()> &f, dbrx_status want) {
    try {
        f();
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), want) << e.what();
        return e.what();
    }
    ADD_FAILURE() << "no error thrown";
    return {};
}
bool has(const std::string &text, const std::string &part) { return text.find(part) != std::string::npos; }

StepCommand sample_step() {
    StepCommand c;
    c.pool = 7;
    c.summarized = true;
    c.seqs.push_back({{1, 2, 3, -4}, 0, {5, 6}, true});
    c.seqs.push_back({{100352}, 4095, {0, 1, 2, 3, 2147483647}, false});
    c.seqs.push_back({{}, 12, {}, true});
    c.needs = {{64, 0.7f}, {0, 0.0f}};
    return c;
}

TEST(DistStepWire, RoundTripsEveryField) {
    const StepCommand c = sample_step();
    expect_same_step(decode_step(encode(c)), c);
    StepCommand full = c;
    full.summarized = false;
    full.needs.clear();
    expect_same_step(decode_step(encode(full)), full);

    const StepPoolCommand p = decode_pool(encode(StepPoolCommand{3, 4096, 16}));
    EXPECT_EQ(p.pool, 3u);
    EXPECT_EQ(p.n_blocks, 4096);
    EXPECT_EQ(p.block_size, 16);
    const StepReply r = decode_reply(encode(StepReply{DBRX_ERR_OUT_OF_MEMORY, -(int64_t{1} << 40), "no room on GPU 3"}));
    EXPECT_EQ(r.status, DBRX_ERR_OUT_OF_MEMORY);
    EXPECT_EQ(r.value, -(int64_t{1} << 40));
    EXPECT_EQ(r.message, "no room on GPU 3");
    const StepHello h = decode_hello(encode(StepHello{5, 16}));
    EXPECT_EQ(h.rank, 5);
    EXPECT_EQ(h.world_size, 16);
    EXPECT_EQ(decode_u32(encode_u32(0xdeadbeefu), "x"), 0xdeadbeefu);
    const StepFrameHeader head = decode_step_header(encode_step_header({StepMsg::Failed, 1ull << 40, 1234}));
    EXPECT_EQ(head.type, StepMsg::Failed);
    EXPECT_EQ(head.seq, 1ull << 40);
    EXPECT_EQ(head.payload_bytes, 1234u);
}

TEST(DistStepWire, RejectsTruncatedPayloads) {
    const std::vector<uint8_t> bytes = encode(sample_step());
    for (size_t n = 0; n < bytes.size(); ++n) {
        const std::string e = error_of([&] { decode_step(std::span(bytes).first(n)); }, DBRX_ERR_IO);
        EXPECT_TRUE(has(e, "cut short") || has(e, "bytes are left") || has(e, "needs")) << "prefix " << n << ": " << e;
    }
    std::vector<uint8_t> longer = bytes;
    longer.push_back(0);
    EXPECT_TRUE(has(error_of([&] { decode_step(longer); }, DBRX_ERR_IO), "unexpected bytes after the last field"));
    const std::vector<uint8_t> reply = encode(StepReply{DBRX_OK, 1, "hello"});
    EXPECT_TRUE(has(error_of([&] { decode_reply(std::span(reply).first(reply.size() - 1)); }, DBRX_ERR_IO), "bytes are left"));
}

TEST(DistStepWire, RejectsOversizedAndGarbage) {
    // A header announcing more than the limit.
    std::vector<uint8_t> head = encode_step_header({StepMsg::Step, 0, 16});
    head[16] = head[17] = head[18] = head[19] = 0xff;
    EXPECT_TRUE(has(error_of([&] { decode_step_header(head); }, DBRX_ERR_IO), "over the limit"));
    // Counts larger than what follows are refused before anything is allocated.
    std::vector<uint8_t> step = encode(sample_step());
    step[5] = step[6] = step[7] = step[8] = 0xff;  // sequence count
    EXPECT_TRUE(has(error_of([&] { decode_step(step); }, DBRX_ERR_IO), "sequence count = 4294967295 but only"));
    std::vector<uint8_t> garbage(kStepHeaderBytes, 'x');
    EXPECT_TRUE(has(error_of([&] { decode_step_header(garbage); }, DBRX_ERR_IO), "magic word"));
    std::vector<uint8_t> version = encode_step_header({StepMsg::Step, 0, 0});
    version[4] = 9;
    EXPECT_TRUE(has(error_of([&] { decode_step_header(version); }, DBRX_ERR_IO), "version 9"));
    std::vector<uint8_t> type = encode_step_header({StepMsg::Step, 0, 0});
    type[6] = 77;
    EXPECT_TRUE(has(error_of([&] { decode_step_header(type); }, DBRX_ERR_IO), "unknown message type 77"));
    std::vector<uint8_t> flag = encode(sample_step());
    flag[4] = 2;  // summarized
    EXPECT_TRUE(has(error_of([&] { decode_step(flag); }, DBRX_ERR_IO), "not a boolean"));
    StepCommand mismatch = sample_step();
    mismatch.needs.pop_back();
    EXPECT_TRUE(has(error_of([&] { decode_step(encode(mismatch)); }, DBRX_ERR_IO), "1 needs for 2 output rows"));
    std::vector<uint8_t> status = encode(StepReply{DBRX_OK, 0, ""});
    status[0] = 200;
    EXPECT_TRUE(has(error_of([&] { decode_reply(status); }, DBRX_ERR_IO), "not a dbrx_status"));
    EXPECT_TRUE(has(error_of([&] { decode_pool(encode(StepPoolCommand{1, 0, 16})); }, DBRX_ERR_IO), "must be >= 1"));
    StepConnection sender(tcp_pair().first.release(), "test");
    std::vector<uint8_t> huge(kMaxStepPayload + 1);
    EXPECT_TRUE(has(error_of([&] { sender.send(StepMsg::Step, huge, 1s); }, DBRX_ERR_INVALID_ARGUMENT), "exceeds the limit"));
}

TEST(DistStepChannel, FramesArriveInOrderBothWays) {
    auto [a, b] = tcp_pair();
    StepConnection left(a.release(), "left"), right(b.release(), "right");
    for (uint32_t i = 0; i < 50; ++i) left.send(StepMsg::DestroyPool, encode_u32(i), 1s);
    for (uint32_t i = 0; i < 50; ++i) {
        const StepFrame f = right.receive(1s);
        ASSERT_EQ(f.type, StepMsg::DestroyPool);
        EXPECT_EQ(decode_u32(f.payload, "test"), i);
    }
    right.send(StepMsg::Reply, encode(StepReply{DBRX_OK, 42, "ok"}), 1s);
    EXPECT_EQ(decode_reply(left.receive(1s).payload).value, 42);
}

TEST(DistStepChannel, BrokenPeersFailInBoundedTime) {
    const std::vector<uint8_t> frame = [] {
        std::vector<uint8_t> f = encode_step_header({StepMsg::Step, 0, 100});
        f.resize(f.size() + 40, 0);  // 40 of the 100 payload bytes
        return f;
    }();
    {  // closes mid-message
        auto [a, b] = tcp_pair();
        ASSERT_EQ(::write(a.get(), frame.data(), frame.size()), static_cast<ssize_t>(frame.size()));
        a.reset();
        StepConnection c(b.release(), "peer");
        EXPECT_TRUE(has(error_of([&] { c.receive(5s); }, DBRX_ERR_IO), "closed the connection after 40 of the 100 bytes"));
    }
    {  // stops mid-message
        auto [a, b] = tcp_pair();
        ASSERT_EQ(::write(a.get(), frame.data(), 7), 7);
        StepConnection c(b.release(), "peer");
        const auto start = Clock::now();
        EXPECT_TRUE(has(error_of([&] { c.receive(300ms); }, DBRX_ERR_IO), "stopped after 7 bytes"));
        EXPECT_LT(Clock::now() - start, 5s);
    }
    {  // never answers
        auto [a, b] = tcp_pair();
        StepConnection c(b.release(), "peer");
        const auto start = Clock::now();
        EXPECT_TRUE(has(error_of([&] { c.receive(300ms); }, DBRX_ERR_TIMEOUT), "nothing from peer in 300 ms"));
        EXPECT_LT(Clock::now() - start, 5s);
    }
    {  // closes between frames; sends garbage
        auto [a, b] = tcp_pair();
        a.reset();
        StepConnection c(b.release(), "peer");
        EXPECT_TRUE(has(error_of([&] { c.receive(5s); }, DBRX_ERR_ENGINE_DEAD), "peer closed the connection"));
        auto [x, y] = tcp_pair();
        ASSERT_EQ(::write(x.get(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27), 27);
        StepConnection d(y.release(), "peer");
        EXPECT_TRUE(has(error_of([&] { d.receive(5s); }, DBRX_ERR_IO), "magic word"));
    }
    {  // never reads: a large send times out instead of blocking
        auto [a, b] = tcp_pair();
        StepConnection c(a.release(), "peer");
        std::vector<uint8_t> big(kMaxStepPayload);
        const auto start = Clock::now();
        EXPECT_TRUE(has(error_of([&] { c.send(StepMsg::Step, big, 300ms); }, DBRX_ERR_TIMEOUT), "took no data"));
        EXPECT_LT(Clock::now() - start, 5s);
    }
}

TEST(DistStepChannel, ListenerWelcomesTheGroupAndDropsStrays) {
    StepChannelListener listener(0, 3, 10s);
    const int32_t port = listener.port();
    // A stray that connects and says nothing useful must not take a place.
    std::thread stray([port] {
        const auto fd = dbrx::testing::connect_loopback(port);
        if (fd.get() >= 0 && ::write(fd.get(), "garbage garbage garbage", 23) < 0) {
        }
        std::this_thread::sleep_for(200ms);
    });
    auto one = std::async(std::launch::async, [port] { return connect_step_channel("127.0.0.1", port, 1, 3, 10s); });
    auto two = std::async(std::launch::async, [port] { return connect_step_channel("localhost", port, 2, 3, 10s); });
    auto peers = listener.accept_all();
    stray.join();
    ASSERT_EQ(peers.size(), 2u);
    EXPECT_TRUE(has(peers[0]->peer(), "process 1"));
    EXPECT_TRUE(has(peers[1]->peer(), "process 2"));
    auto c1 = one.get();
    auto c2 = two.get();
    peers[1]->send(StepMsg::Heartbeat, {}, 1s);
    EXPECT_EQ(c2->receive(1s).type, StepMsg::Heartbeat);
}

// dbrx_model_load opens the step channel on the rendezvous port, then NCCL's rendezvous binds the
// same port while the step connections on it stay open.
TEST(DistStepChannel, NcclRendezvousReusesThePortAfterTheChannel) {
    StepChannelListener listener(0, 2, 10s);
    const int32_t port = listener.port();
    auto follower = std::async(std::launch::async, [port] {
        auto channel = connect_step_channel("127.0.0.1", port, 1, 2, 10s);
        RendezvousConfig c;
        c.host = "127.0.0.1";
        c.port = port;
        c.rank = 1;
        c.world_size = 2;
        c.timeout = 10s;
        return std::make_pair(std::move(channel), rendezvous_receive(c));
    });
    auto peers = listener.accept_all();
    const std::vector<uint8_t> id{1, 2, 3, 4, 5};
    RendezvousServer server(port, 2, 10s);
    server.broadcast(id);
    auto [channel, got] = follower.get();
    EXPECT_EQ(got, id);
    peers[0]->send(StepMsg::Heartbeat, {}, 1s);  // the step channel outlives the rendezvous
    EXPECT_EQ(channel->receive(1s).type, StepMsg::Heartbeat);
}

TEST(DistStepChannel, ListenerRefusalsAndTimeouts) {
    {
        StepChannelListener listener(0, 2, 10s);
        const int32_t port = listener.port();
        auto wrong = std::async(std::launch::async, [port] { return connect_step_channel("127.0.0.1", port, 1, 3, 10s); });
        EXPECT_TRUE(has(error_of([&] { listener.accept_all(); }, DBRX_ERR_INVALID_ARGUMENT), "says the group has 3"));
        EXPECT_TRUE(has(error_of([&] { wrong.get(); }, DBRX_ERR_INVALID_ARGUMENT), "refused"));
    }
    {  // a process of another build
        StepChannelListener listener(0, 2, 10s);
        const int32_t port = listener.port();
        std::thread other([port] {
            std::vector<uint8_t> frame = encode_step_header({StepMsg::Hello, 0, 8});
            frame[4] = 9;  // version 9
            const std::vector<uint8_t> hello = encode(StepHello{1, 2});
            frame.insert(frame.end(), hello.begin(), hello.end());
            const auto fd = dbrx::testing::connect_loopback(port);
            if (fd.get() >= 0 && ::write(fd.get(), frame.data(), frame.size()) == static_cast<ssize_t>(frame.size()))
                std::this_thread::sleep_for(500ms);
        });
        EXPECT_TRUE(has(error_of([&] { listener.accept_all(); }, DBRX_ERR_INVALID_ARGUMENT),
                        "peer speaks step protocol version 9, this build version 1"));
        other.join();
    }
    {
        StepChannelListener listener(0, 3, 500ms);
        const auto start = Clock::now();
        EXPECT_TRUE(has(error_of([&] { listener.accept_all(); }, DBRX_ERR_TIMEOUT), "process(es) 1, 2 never connected"));
        EXPECT_LT(Clock::now() - start, 5s);
    }
    {
        int32_t port = 0;
        { StepChannelListener closed(0, 2, 1s); port = closed.port(); }  // nothing listens there now
        const auto start = Clock::now();
        EXPECT_TRUE(has(error_of([&] { connect_step_channel("127.0.0.1", port, 1, 2, 500ms); }, DBRX_ERR_TIMEOUT),
                        "no welcome within 500 ms"));
        EXPECT_LT(Clock::now() - start, 5s);
    }
}

}  // namespace
}  // namespace dbrx::dist
