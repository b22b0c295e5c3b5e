// The dbrx tool's multi-GPU options (--devices, --rendezvous, --nodes, --node-rank): bad values
// exit with status 2 and one line naming the option or the C API field, before any GPU is touched.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

namespace fs = std::filesystem;

struct Run {
    int exit_code;
    std::string err;
};

Run run_generate(const std::string &extra) {
    const fs::path err = fs::temp_directory_path() / ("dbrx_dist_cli_" + std::to_string(::getpid()) + ".err");
    const std::string cmd = std::string(DBRX_CLI_PATH) + " generate --model " DBRX_SOURCE_DIR
                            "/fixtures/tiny-dbrx --prompt-ids 1,2 --max-tokens 1 " + extra + " >/dev/null 2>" +
                            err.string();
    const int status = std::system(cmd.c_str());
    std::ifstream in(err);
    Run r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, std::string(std::istreambuf_iterator<char>(in), {})};
    fs::remove(err);
    return r;
}

void expect_usage_error(const std::string &extra, const std::string &needle) {
    SCOPED_TRACE(extra);
    // --nodes 1 --node-rank 0: no launcher variable of the test's environment takes part.
    const Run r = run_generate(extra.find("--nodes") == std::string::npos ? extra + " --nodes 1 --node-rank 0" : extra);
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err << "\nexpected to mention: " << needle;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "one line expected: " << r.err;
}

TEST(DistCli, BadMultiGpuOptionsExitWithTwo) {
    expect_usage_error("--device cuda --tp 2 --devices 0,x", "--devices must be a comma-separated list");
    expect_usage_error("--device cuda --tp 2 --devices 1,1", "params.devices lists GPU 1 twice");
    expect_usage_error("--device cuda --tp 2 --devices 0,-1", "params.devices[1] = -1");
    expect_usage_error("--device cuda --tp 4 --devices 0,1", "tensor_parallel * expert_parallel = 4 but n_nodes");
    expect_usage_error("--device cuda --tp 2 --rendezvous nohost", "params.rendezvous = \"nohost\": expected host:port");
    expect_usage_error("--device cuda --tp 2 --rendezvous h:70000", "the port must be an integer in [1, 65535]");
    expect_usage_error("--device cuda --tp 2 --nodes 0", "--nodes must be an integer");
    expect_usage_error("--device cuda --tp 2 --nodes 2 --node-rank 2", "params.node_rank 2 outside [0, n_nodes 2)");
    expect_usage_error("--device cpu --tp 2 --devices 0,1", "params.devices name GPUs");
    expect_usage_error("--device cpu --tp 2 --nodes 2 --node-rank 1", "runs in one process");
}

// CI has no GPU and the GPU machine one: the tp 2 benchmark must say it needs 2 GPUs (or that the
// build has no CUDA), with exit code 2, never crash.
TEST(DistCli, ShardedBenchWithoutEnoughGpusExitsWithTwo) {
    const fs::path err = fs::temp_directory_path() / ("dbrx_dist_bench_" + std::to_string(::getpid()) + ".err");
    const std::string cmd = std::string(DBRX_CLI_PATH) + " bench --synthetic dbrx --layers 1 --tp 2 --devices 0,63 "
                            ">/dev/null 2>" + err.string();
    const int status = std::system(cmd.c_str());
    std::ifstream in(err);
    const std::string text(std::istreambuf_iterator<char>(in), {});
    fs::remove(err);
    ASSERT_TRUE(WIFEXITED(status)) << text;
    EXPECT_EQ(WEXITSTATUS(status), 2) << text;
    EXPECT_TRUE(text.find("needs 2 GPUs (devices 0,63)") != std::string::npos ||
                text.find("this build has none") != std::string::npos)
        << text;
}

}  // namespace
