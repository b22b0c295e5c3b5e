// The parallel fields of dbrx_model_params (devices, rendezvous, n_nodes, node_rank with tp / ep)
// are checked before anything is loaded: every bad value is refused with INVALID_ARGUMENT (or
// UNSUPPORTED) and a message naming the field, whatever the build and however many GPUs there are.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "api/api_parallel.h"
#include "dbrx/dbrx.h"
#include "util/error.h"

namespace dbrx::api {
namespace {

const char *const kTiny = DBRX_SOURCE_DIR "/fixtures/tiny-dbrx";

dbrx_model_params cuda_params(int32_t tp, int32_t ep, std::initializer_list<int32_t> devices) {
    dbrx_model_params p = dbrx_model_default_params();
    p.device = DBRX_DEVICE_CUDA;
    p.tensor_parallel = tp;
    p.expert_parallel = ep;
    p.n_nodes = 1;  // explicit, so that no launcher variable of the test's environment interferes
    p.node_rank = 0;
    p.n_devices = static_cast<int32_t>(devices.size());
    int32_t i = 0;
    for (int32_t d : devices) p.devices[i++] = d;
    return p;
}

// dbrx_model_load must fail with `status` and a message containing `needle`, loading nothing.
void expect_load_fails(const dbrx_model_params &p, dbrx_status status, const std::string &needle) {
    dbrx_model *model = reinterpret_cast<dbrx_model *>(0x1);
    EXPECT_EQ(dbrx_model_load(kTiny, &p, &model), status) << dbrx_last_error();
    EXPECT_EQ(model, nullptr);
    EXPECT_NE(std::string(dbrx_last_error()).find(needle), std::string::npos)
        << "message: " << dbrx_last_error() << "\nexpected to mention: " << needle;
}

// No launcher in the environment: n_nodes / node_rank default to one process.
const char *no_env(const char *) { return nullptr; }

TEST(DistApi, DefaultsAreOneProcessOnTheFirstGpu) {
    dbrx_model_params p = dbrx_model_default_params();
    EXPECT_EQ(p.n_devices, 0);
    EXPECT_EQ(p.rendezvous, nullptr);
    EXPECT_EQ(p.n_nodes, -1);
    EXPECT_EQ(p.node_rank, -1);
    p.device = DBRX_DEVICE_CUDA;
    p.tensor_parallel = 2;
    ParallelLayout l = parallel_layout(p, DBRX_DEVICE_CUDA, no_env);
    EXPECT_TRUE(l.devices.empty());
    EXPECT_EQ(l.rendezvous.world_size, 1);
    EXPECT_EQ(l.rendezvous.rank, 0);
}

TEST(DistApi, BadDeviceListsAreRefused) {
    expect_load_fails(cuda_params(2, 1, {0, -1}), DBRX_ERR_INVALID_ARGUMENT, "params.devices[1] = -1");
    expect_load_fails(cuda_params(2, 1, {1, 1}), DBRX_ERR_INVALID_ARGUMENT, "lists GPU 1 twice");
    dbrx_model_params p = cuda_params(2, 1, {0, 1});
    p.n_devices = DBRX_MAX_DEVICES + 1;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.n_devices must be in [0, 16]");
    p.n_devices = -1;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.n_devices");
}

TEST(DistApi, RanksMustMatchTheGpus) {
    // tp * ep = 4 over one process with 2 GPUs, or 2 ranks on 3 GPUs.
    expect_load_fails(cuda_params(2, 2, {0, 1}), DBRX_ERR_INVALID_ARGUMENT, "= 4 but n_nodes * n_devices = 1 * 2");
    expect_load_fails(cuda_params(2, 1, {0, 1, 2}), DBRX_ERR_INVALID_ARGUMENT, "n_nodes * n_devices = 1 * 3");
    expect_load_fails(cuda_params(1, 1, {0, 1}), DBRX_ERR_INVALID_ARGUMENT, "one rank runs on one GPU");
    dbrx_model_params p = cuda_params(2, 1, {0});
    p.n_nodes = 2;
    p.node_rank = 0;
    p.rendezvous = "localhost:29500";
    // 2 ranks = 2 processes x 1 GPU: valid, so the layout resolves (loading would start the rendezvous).
    ParallelLayout l = parallel_layout(p, DBRX_DEVICE_CUDA, no_env);
    EXPECT_EQ(l.rendezvous.host, "localhost");
    EXPECT_EQ(l.rendezvous.port, 29500);
    EXPECT_EQ(l.rendezvous.world_size, 2);
    p.tensor_parallel = 3;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "cannot be split evenly over 2 processes");
}

TEST(DistApi, BadRendezvousAddressesAreRefused) {
    for (const char *bad : {"localhost", "localhost:", ":29500", "host:0", "host:65536", "host:29x", "::1:29500",
                            "[::1:29500", "my host:29500"}) {
        SCOPED_TRACE(bad);
        dbrx_model_params p = cuda_params(2, 1, {0, 1});
        p.rendezvous = bad;
        expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.rendezvous");
    }
    dbrx_model_params p = cuda_params(2, 1, {0, 1});
    p.rendezvous = "[::1]:29500";
    ParallelLayout l = parallel_layout(p, DBRX_DEVICE_CUDA, no_env);
    EXPECT_EQ(l.rendezvous.host, "::1");
    EXPECT_EQ(l.rendezvous.port, 29500);
}

TEST(DistApi, NodeCountsAndRanksAreChecked) {
    dbrx_model_params p = cuda_params(2, 1, {0, 1});
    p.n_nodes = 0;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.n_nodes");
    p.n_nodes = 2;
    p.node_rank = 2;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.node_rank 2 outside [0, n_nodes 2)");
    p.node_rank = -2;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.node_rank");
}

TEST(DistApi, LauncherEnvironmentFillsTheDefaults) {
    std::map<std::string, std::string> env = {{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", "10.0.0.1"},
                                              {"MASTER_PORT", "29501"}};
    auto getenv_fn = [&](const char *name) -> const char * {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
    };
    dbrx_model_params p = cuda_params(4, 1, {0, 1});
    p.n_nodes = -1;
    p.node_rank = -1;
    ParallelLayout l = parallel_layout(p, DBRX_DEVICE_CUDA, getenv_fn);
    EXPECT_EQ(l.rendezvous.world_size, 2);
    EXPECT_EQ(l.rendezvous.rank, 1);
    EXPECT_EQ(l.rendezvous.host, "10.0.0.1");
    EXPECT_EQ(l.rendezvous.port, 29501);
    // Explicit fields win over the environment.
    p.rendezvous = "head:1234";
    p.n_nodes = 4;
    p.node_rank = 3;
    p.tensor_parallel = 8;
    l = parallel_layout(p, DBRX_DEVICE_CUDA, getenv_fn);
    EXPECT_EQ(l.rendezvous.world_size, 4);
    EXPECT_EQ(l.rendezvous.rank, 3);
    EXPECT_EQ(l.rendezvous.host, "head");
    EXPECT_EQ(l.rendezvous.port, 1234);
    // Several processes and no address anywhere.
    env.erase("MASTER_ADDR");
    p.rendezvous = nullptr;
    try {
        parallel_layout(p, DBRX_DEVICE_CUDA, getenv_fn);
        ADD_FAILURE() << "no address accepted";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(e.what()).find("MASTER_ADDR"), std::string::npos) << e.what();
    }
}

TEST(DistApi, CpuTakesNoGpusAndOneProcess) {
    dbrx_model_params p = cuda_params(2, 1, {0, 1});
    p.device = DBRX_DEVICE_CPU;
    p.n_nodes = -1;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.devices name GPUs");
    p.n_devices = 0;
    p.n_nodes = 2;
    p.node_rank = 0;
    expect_load_fails(p, DBRX_ERR_UNSUPPORTED, "runs in one process");
}

TEST(DistApi, TensorAndExpertParallelMustBePositive) {
    dbrx_model_params p = dbrx_model_default_params();
    p.tensor_parallel = 0;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "params.tensor_parallel and expert_parallel must be >= 1");
    p.tensor_parallel = 1;
    p.expert_parallel = -3;
    expect_load_fails(p, DBRX_ERR_INVALID_ARGUMENT, "got 1 and -3");
}

}  // namespace
}  // namespace dbrx::api
