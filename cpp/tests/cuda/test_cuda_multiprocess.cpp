// Serving across processes on two GPUs of one host: this test process is process 0 (GPU 0, the
// engine) and spawns itself as process 1 (GPU 1, dbrx_model_serve) with tp 2 over NCCL, as
// `dbrx serve-rank` would run on another host. Greedy ids and prompt logits must match one GPU's
// within bf16 tolerance; dbrx_model_free on process 0 must let process 1 exit 0; and killing process
// 1 mid-run must fail process 0's requests with ENGINE_DEAD at once, not at a timeout. The child
// never outlives a test: the fixture kills it, and it dies with its parent (PR_SET_PDEATHSIG).
// Skipped with fewer than two GPUs.
#include <cuda_runtime.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dbrx/dbrx.h"
#include "cuda_test_util.h"
#include "reference_fixture.h"

extern char **environ;

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr const char *kFollowerEnv = "DBRX_MP_FOLLOWER";  // "<model dir>|<port>|<parent pid>"
constexpr double kMarginFloor = 0.2;                      // as test_cuda_sharded.cpp
constexpr float kLogitTolerance = 0.05f;                  // bf16 weights, another reduction order
const char *const kFixtures[] = {"/fixtures/tiny-dbrx", "/models/tiny-dbrx-cl100k"};

using dbrx::cuda::test::visible_gpus;

// A port free right now on localhost (process 0 binds it again a moment later).
int32_t free_port() {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    const bool ok = ::bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) == 0 &&
                    ::getsockname(fd, reinterpret_cast<sockaddr *>(&a), &len) == 0;
    ::close(fd);
    return ok ? ntohs(a.sin_port) : -1;
}

dbrx_model_params group_params(int32_t node_rank, int32_t device, const std::string &rendezvous) {
    dbrx_model_params p = dbrx_model_default_params();
    p.device = DBRX_DEVICE_CUDA;
    p.tensor_parallel = 2;
    p.n_nodes = 2;
    p.node_rank = node_rank;
    p.n_devices = 1;
    p.devices[0] = device;
    p.rendezvous = rendezvous.c_str();
    return p;
}

struct Generated {
    std::vector<int32_t> ids;
    std::vector<float> prompt_logits;
};

Generated generate(dbrx_engine *engine, const dbrx::testing::RefCase &c, int32_t n_vocab) {
    dbrx_sampling_params sp = dbrx_sampling_default_params();
    sp.max_tokens = static_cast<int32_t>(c.greedy.size());
    sp.n_stop_ids = 0;
    Generated g;
    g.ids.resize(c.greedy.size());
    g.prompt_logits.resize(static_cast<size_t>(n_vocab));
    int32_t n_out = 0;
    dbrx_finish_reason finish = DBRX_FINISH_NONE;
    EXPECT_EQ(dbrx_generate(engine, c.prompt.data(), static_cast<int32_t>(c.prompt.size()), &sp, g.ids.data(),
                            static_cast<int32_t>(g.ids.size()), &n_out, g.prompt_logits.data(), &finish),
              DBRX_OK)
        << dbrx_last_error();
    g.ids.resize(static_cast<size_t>(std::max(0, n_out)));
    return g;
}

// Process 1: run only when spawned by the fixture below (the filter names it and the variable is set).
TEST(CudaMultiprocessFollower, DISABLED_Serve) {
    const char *spec = std::getenv(kFollowerEnv);
    if (spec == nullptr) GTEST_SKIP() << "process 1 of CudaMultiprocess; runs only when spawned by it";
    const std::string s = spec;
    const size_t a = s.find('|'), b = s.rfind('|');
    const std::string dir = s.substr(0, a), port = s.substr(a + 1, b - a - 1);
    const pid_t parent = static_cast<pid_t>(std::atoi(s.substr(b + 1).c_str()));
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive process 0
    if (::getppid() != parent) std::_Exit(4);
    const std::string rendezvous = "127.0.0.1:" + port;
    const dbrx_model_params p = group_params(1, 1, rendezvous);
    dbrx_model *model = nullptr;
    if (dbrx_model_load(dir.c_str(), &p, &model) != DBRX_OK) {
        std::fprintf(stderr, "process 1: load failed: %s\n", dbrx_last_error());
        std::_Exit(3);
    }
    const dbrx_status st = dbrx_model_serve(model);
    std::fprintf(stderr, "process 1: dbrx_model_serve: %s %s\n", dbrx_status_name(st), dbrx_last_error());
    dbrx_model_free(model);
    std::_Exit(st == DBRX_OK ? 0 : st == DBRX_ERR_ENGINE_DEAD ? 1 : 2);
}

class CudaMultiprocess : public ::testing::Test {
protected:
    void SetUp() override {
        const int n = visible_gpus();
        if (n < 2) GTEST_SKIP() << "two processes on two GPUs need 2 GPUs; " << n << " visible";
    }
    void TearDown() override {
        if (child_ > 0) {
            ::kill(child_, SIGKILL);
            ::waitpid(child_, nullptr, 0);
            child_ = -1;
        }
    }

    // Spawns this test binary as process 1 serving `dir`; returns the rendezvous address.
    std::string spawn_follower(const std::string &dir) {
        const int32_t port = free_port();
        EXPECT_GT(port, 0);
        char exe[4096] = {};
        const ssize_t len = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
        EXPECT_GT(len, 0);
        std::vector<std::string> env_strings;
        for (char **e = environ; *e != nullptr; ++e)
            if (std::string(*e).rfind(std::string(kFollowerEnv) + "=", 0) != 0) env_strings.emplace_back(*e);
        env_strings.push_back(std::string(kFollowerEnv) + "=" + dir + "|" + std::to_string(port) + "|" +
                              std::to_string(::getpid()));
        std::vector<char *> envp;
        for (auto &e : env_strings) envp.push_back(e.data());
        envp.push_back(nullptr);
        std::string filter = "--gtest_filter=CudaMultiprocessFollower.DISABLED_Serve";
        std::string disabled = "--gtest_also_run_disabled_tests";
        char *argv[] = {exe, filter.data(), disabled.data(), nullptr};
        EXPECT_EQ(::posix_spawn(&child_, exe, nullptr, nullptr, argv, envp.data()), 0);
        return "127.0.0.1:" + std::to_string(port);
    }

    // The child's exit code once it exits, or nothing after `timeout`.
    std::optional<int> wait_child(std::chrono::milliseconds timeout) {
        const auto deadline = Clock::now() + timeout;
        while (Clock::now() < deadline) {
            int status = 0;
            const pid_t r = ::waitpid(child_, &status, WNOHANG);
            if (r == child_) {
                child_ = -1;
                return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            }
            std::this_thread::sleep_for(20ms);
        }
        return std::nullopt;
    }

    pid_t child_ = -1;
};

TEST_F(CudaMultiprocess, TwoProcessesMatchOneGpuThenShutDownCleanly) {
    for (const char *fixture : kFixtures) {
        SCOPED_TRACE(fixture);
        const std::string dir = std::string(DBRX_SOURCE_DIR) + fixture;
        const auto cases = dbrx::testing::load_ref_cases(dir);
        dbrx_engine_params ep = dbrx_engine_default_params();
        ep.kv_blocks = 64;

        // One GPU first, freed before the group loads.
        dbrx_model_params one_p = dbrx_model_default_params();
        one_p.device = DBRX_DEVICE_CUDA;
        dbrx_model *one = nullptr;
        ASSERT_EQ(dbrx_model_load(dir.c_str(), &one_p, &one), DBRX_OK) << dbrx_last_error();
        dbrx_model_info info{};
        ASSERT_EQ(dbrx_model_get_info(one, &info), DBRX_OK);
        dbrx_engine *engine = nullptr;
        ASSERT_EQ(dbrx_engine_create(one, &ep, &engine), DBRX_OK) << dbrx_last_error();
        std::vector<Generated> want;
        for (const auto &c : cases) want.push_back(generate(engine, c, info.n_vocab));
        dbrx_engine_free(engine);
        dbrx_model_free(one);

        const std::string rendezvous = spawn_follower(dir);
        const dbrx_model_params p = group_params(0, 0, rendezvous);
        dbrx_model *model = nullptr;
        ASSERT_EQ(dbrx_model_load(dir.c_str(), &p, &model), DBRX_OK) << dbrx_last_error();
        ASSERT_EQ(dbrx_engine_create(model, &ep, &engine), DBRX_OK) << dbrx_last_error();
        for (size_t ci = 0; ci < cases.size(); ++ci) {
            const Generated got = generate(engine, cases[ci], info.n_vocab);
            float max_diff = 0;
            for (size_t v = 0; v < got.prompt_logits.size(); ++v)
                max_diff = std::max(max_diff, std::fabs(got.prompt_logits[v] - want[ci].prompt_logits[v]));
            EXPECT_LE(max_diff, kLogitTolerance) << "case " << ci << ": prompt logits, two processes vs one GPU";
            ASSERT_EQ(got.ids.size(), want[ci].ids.size()) << "case " << ci;
            // Free-running greedy: binding up to the first step whose reference margin is small.
            for (size_t s = 0; s < got.ids.size() && cases[ci].margins[s] > kMarginFloor; ++s)
                EXPECT_EQ(got.ids[s], want[ci].ids[s]) << "case " << ci << " step " << s;
        }
        dbrx_engine_free(engine);
        const auto start = Clock::now();
        dbrx_model_free(model);  // Shutdown to process 1
        const std::optional<int> code = wait_child(60s);
        ASSERT_TRUE(code.has_value()) << "process 1 still runs 60 s after process 0 freed its model";
        EXPECT_EQ(*code, 0) << "process 1's exit code (1: ENGINE_DEAD, 2: another error, 3: load failed)";
        EXPECT_LT(Clock::now() - start, 60s);
    }
}

TEST_F(CudaMultiprocess, KillingTheFollowerFailsRequestsWithEngineDead) {
    const std::string dir = std::string(DBRX_SOURCE_DIR) + kFixtures[0];
    const auto cases = dbrx::testing::load_ref_cases(dir);
    const std::string rendezvous = spawn_follower(dir);
    const dbrx_model_params p = group_params(0, 0, rendezvous);
    dbrx_model *model = nullptr;
    ASSERT_EQ(dbrx_model_load(dir.c_str(), &p, &model), DBRX_OK) << dbrx_last_error();
    dbrx_engine_params ep = dbrx_engine_default_params();
    ep.kv_blocks = 64;
    dbrx_engine *engine = nullptr;
    ASSERT_EQ(dbrx_engine_create(model, &ep, &engine), DBRX_OK) << dbrx_last_error();
    dbrx_sampling_params sp = dbrx_sampling_default_params();
    sp.n_stop_ids = 0;
    sp.max_tokens = 900;
    const std::vector<int32_t> &prompt = cases[0].prompt;
    uint64_t id = 0;
    ASSERT_EQ(dbrx_engine_submit(engine, prompt.data(), static_cast<int32_t>(prompt.size()), &sp, &id), DBRX_OK)
        << dbrx_last_error();
    dbrx_token toks[64];
    int32_t n = 0;
    dbrx_finish_reason finish = DBRX_FINISH_NONE;
    ASSERT_EQ(dbrx_engine_poll(engine, id, 30000, toks, 64, &n, &finish), DBRX_OK) << dbrx_last_error();
    ASSERT_GT(n, 0);

    const auto killed = Clock::now();
    ::kill(child_, SIGKILL);
    ::waitpid(child_, nullptr, 0);
    child_ = -1;
    // The request in flight fails; if it happened to finish first, the next one fails.
    std::string error;
    const auto deadline = killed + 60s;
    while (finish == DBRX_FINISH_NONE && Clock::now() < deadline) {
        const dbrx_status st = dbrx_engine_poll(engine, id, 200, toks, 64, &n, &finish);
        ASSERT_TRUE(st == DBRX_OK || st == DBRX_ERR_TIMEOUT) << dbrx_last_error();
        if (finish == DBRX_FINISH_ERROR) error = dbrx_last_error();
    }
    ASSERT_NE(finish, DBRX_FINISH_NONE) << "process 0's request still runs 60 s after process 1 was killed";
    if (finish != DBRX_FINISH_ERROR) {
        const dbrx_status st = dbrx_engine_submit(engine, prompt.data(), static_cast<int32_t>(prompt.size()), &sp, &id);
        if (st == DBRX_OK) {
            finish = DBRX_FINISH_NONE;
            while (finish == DBRX_FINISH_NONE && Clock::now() < deadline)
                dbrx_engine_poll(engine, id, 200, toks, 64, &n, &finish);
            EXPECT_EQ(finish, DBRX_FINISH_ERROR);
        } else {
            EXPECT_EQ(st, DBRX_ERR_ENGINE_DEAD);
        }
        error = dbrx_last_error();
    }
    EXPECT_LT(Clock::now() - killed, 30s) << "the failure took a collective timeout";
    EXPECT_NE(error.find("process 1"), std::string::npos) << error;
    // The engine is dead: new requests are refused with ENGINE_DEAD.
    EXPECT_EQ(dbrx_engine_submit(engine, prompt.data(), static_cast<int32_t>(prompt.size()), &sp, &id),
              DBRX_ERR_ENGINE_DEAD);
    const auto freeing = Clock::now();
    dbrx_engine_free(engine);
    dbrx_model_free(model);
    EXPECT_LT(Clock::now() - freeing, 30s) << "freeing waited on the dead process";
}

}  // namespace
