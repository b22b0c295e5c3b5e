// The NCCL communicator, in builds with NCCL. Without a GPU (CI) only the refusal is checked; on
// a GPU machine a one-rank communicator runs every collective, abort() fails the next call, and
// NCCL initialisation whose peer never joins (or cannot, sharing the GPU) ends in ENGINE_DEAD
// within the timeout instead of hanging. Several GPUs are needed for real cross-rank traffic.
#ifdef DBRX_WITH_NCCL

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dist/nccl_communicator.h"
#include "dist/tcp_rendezvous.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

int visible_gpus() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// A device buffer holding `values`.
struct DeviceFloats {
    float *ptr = nullptr;
    size_t n;
    explicit DeviceFloats(const std::vector<float> &values) : n(values.size()) {
        EXPECT_EQ(cudaMalloc(reinterpret_cast<void **>(&ptr), n * sizeof(float)), cudaSuccess);
        cudaMemcpy(ptr, values.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    }
    ~DeviceFloats() { cudaFree(ptr); }
    std::vector<float> read() const {
        std::vector<float> out(n);
        cudaMemcpy(out.data(), ptr, n * sizeof(float), cudaMemcpyDeviceToHost);
        return out;
    }
};

TEST(DistNccl, RefusesMissingDevices) {
    const int gpus = visible_gpus();
    std::vector<int32_t> devices = {gpus};  // one past the last visible device
    try {
        NcclCommunicator::create_local(RendezvousConfig{"", -1, 0, 1}, devices, 5s);
        ADD_FAILURE() << "device " << gpus << " accepted";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_UNSUPPORTED);
        EXPECT_NE(std::string(e.what()).find("CUDA device(s) visible"), std::string::npos) << e.what();
    }
}

TEST(DistNccl, OneRankRunsEveryCollective) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device";
    std::vector<int32_t> devices = {0};
    auto comms = NcclCommunicator::create_local(RendezvousConfig{"", -1, 0, 1}, devices, 30s);
    ASSERT_EQ(comms.size(), 1u);
    NcclCommunicator &c = *comms[0];
    EXPECT_EQ(c.size(), 1);
    DeviceFloats a({1.5f, -2.0f, 3.0f}), gathered({0, 0, 0}), moved({0, 0, 0});
    c.all_reduce_sum(a.ptr, 3);
    EXPECT_EQ(a.read(), (std::vector<float>{1.5f, -2.0f, 3.0f}));
    c.all_gather(a.ptr, 3, gathered.ptr);
    EXPECT_EQ(gathered.read(), a.read());
    std::vector<int64_t> counts = {3};
    c.all_to_all_v(a.ptr, counts, moved.ptr, counts);
    EXPECT_EQ(moved.read(), a.read());
    c.barrier();
    EXPECT_FALSE(c.aborted());
    // After an abort every collective fails at once, naming the reason.
    c.abort("injected fault");
    EXPECT_TRUE(c.aborted());
    try {
        c.all_reduce_sum(a.ptr, 3);
        ADD_FAILURE() << "collective after abort succeeded";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD);
        EXPECT_NE(std::string(e.what()).find("rank 0 aborted: injected fault"), std::string::npos) << e.what();
    }
}

// A rank's step: collectives only enqueued on the communicator's stream (also inside a CUDA graph
// capture, as the sharded backend's decode graphs hold them), one finish_step() waiting for all.
TEST(DistNccl, EnqueuedCollectivesFinishWithTheStepAndCapture) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device";
    std::vector<int32_t> devices = {0};
    auto comms = NcclCommunicator::create_local(RendezvousConfig{"", -1, 0, 1}, devices, 30s);
    NcclCommunicator &c = *comms[0];
    auto stream = static_cast<cudaStream_t>(c.stream());
    DeviceFloats a({1.5f, -2.0f, 3.0f}), gathered({0, 0, 0});
    c.enqueue_all_reduce_sum(a.ptr, 3);
    c.enqueue_all_gather(a.ptr, 3, gathered.ptr);
    c.finish_step();
    EXPECT_EQ(gathered.read(), (std::vector<float>{1.5f, -2.0f, 3.0f}));

    DeviceFloats b({4.0f, 5.0f, 6.0f}), out({0, 0, 0});
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    c.enqueue_all_reduce_sum(b.ptr, 3);
    c.enqueue_all_gather(b.ptr, 3, out.ptr);
    cudaGraph_t graph = nullptr;
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    EXPECT_EQ(out.read(), (std::vector<float>{0, 0, 0})) << "captured collectives ran during the capture";
    for (int i = 0; i < 2; ++i) ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    c.finish_step();
    EXPECT_EQ(out.read(), (std::vector<float>{4.0f, 5.0f, 6.0f}));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);

    c.abort("injected fault");
    try {
        c.finish_step();
        ADD_FAILURE() << "finish_step after an abort succeeded";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD);
        EXPECT_NE(std::string(e.what()).find("injected fault"), std::string::npos) << e.what();
    }
}

// Finds a port nobody listens on by letting the rendezvous server pick one, then freeing it.
int32_t free_port() {
    RendezvousServer probe(0, 1, 1s);
    return probe.port();
}

TEST(DistNccl, InitWithAPeerThatNeverJoinsFailsWithinTheTimeout) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device";
    const int32_t port = free_port();
    // Process 1 takes the unique id through the rendezvous, then dies before NCCL init.
    std::thread dead_peer([port] {
        try {
            rendezvous_receive({"127.0.0.1", port, 1, 2, 20s});
        } catch (const Error &) {
        }
    });
    std::vector<int32_t> devices = {0};
    const auto start = Clock::now();
    std::optional<Error> error;
    try {
        NcclCommunicator::create_local(RendezvousConfig{"127.0.0.1", port, 0, 2, 20s}, devices, 3s);
    } catch (const Error &e) {
        error = e;
    }
    const auto elapsed = Clock::now() - start;
    dead_peer.join();
    ASSERT_TRUE(error) << "NCCL init with a missing peer succeeded";
    EXPECT_EQ(error->status(), DBRX_ERR_ENGINE_DEAD);
    EXPECT_NE(std::string(error->what()).find("NCCL init of ranks 0..0 of 2"), std::string::npos) << error->what();
    EXPECT_LT(elapsed, 8s);
}

TEST(DistNccl, TwoRanksOnOneGpuFailInsteadOfHanging) {
    if (visible_gpus() != 1) GTEST_SKIP() << "needs exactly one CUDA device";
    const int32_t port = free_port();
    std::vector<std::optional<Error>> errors(2);
    std::vector<std::thread> ranks;
    const auto start = Clock::now();
    for (int32_t r = 0; r < 2; ++r)
        ranks.emplace_back([&, r] {
            std::vector<int32_t> devices = {0};
            try {
                auto comms = NcclCommunicator::create_local(RendezvousConfig{"127.0.0.1", port, r, 2, 20s}, devices, 5s);
                float *buf = nullptr;
                cudaMalloc(reinterpret_cast<void **>(&buf), sizeof(float));
                comms[0]->all_reduce_sum(buf, 1);
                cudaFree(buf);
            } catch (const Error &e) {
                errors[r] = e;
            }
        });
    for (auto &t : ranks) t.join();
    // NCCL refuses two ranks on one device; whichever way it reports it, both ranks end in an error.
    for (int32_t r = 0; r < 2; ++r) {
        ASSERT_TRUE(errors[r]) << "rank " << r << " succeeded on a shared GPU";
        EXPECT_EQ(errors[r]->status(), DBRX_ERR_ENGINE_DEAD) << errors[r]->what();
        EXPECT_NE(std::string(errors[r]->what()).find("NCCL"), std::string::npos) << errors[r]->what();
    }
    EXPECT_LT(Clock::now() - start, 15s);
}

}  // namespace
}  // namespace dbrx::dist

#endif  // DBRX_WITH_NCCL
