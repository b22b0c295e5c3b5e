// The dbrx command-line tool: shared helpers of its subcommands.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "dbrx/dbrx.h"

namespace dbrx::cli {

// Bad command-line input: printed as one line on stderr, exit code 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A failing C API call: exit 2 for bad input or a bad checkpoint, 1 for internal failures.
struct ApiError : std::runtime_error {
    dbrx_status status;
    ApiError(dbrx_status s, const std::string &what) : std::runtime_error(what), status(s) {}
};

void check(dbrx_status status, const char *what);

// --name value options and --flag switches after the subcommand.
class Args {
public:
    Args(int argc, char **argv, int first, const std::vector<std::string> &flags);
    bool has(const std::string &name) const { return values_.count(name) > 0; }
    std::string str(const std::string &name, const std::string &fallback = "") const;
    std::string required(const std::string &name) const;
    int64_t integer(const std::string &name, int64_t fallback, int64_t lo, int64_t hi) const;
    double number(const std::string &name, double fallback) const;
    // Fails on any option the subcommand did not read.
    void reject_unknown() const;

private:
    std::map<std::string, std::string> values_;
    mutable std::map<std::string, bool> used_;
};

std::vector<int32_t> parse_ids(const std::string &text, const std::string &option);

// Options shared by every subcommand that loads a model: --model, --device, --threads, --tp, --ep,
// and for several GPUs --devices, --rendezvous, --nodes, --node-rank.
struct LoadedModel {
    dbrx_model *model = nullptr;
    dbrx_engine *engine = nullptr;
    dbrx_model_info info{};
    LoadedModel() = default;
    LoadedModel(const LoadedModel &) = delete;
    LoadedModel &operator=(const LoadedModel &) = delete;
    ~LoadedModel();
};
void load_model(const Args &args, dbrx_engine_params engine_params, LoadedModel &out);
// The same without the engine (`serve-rank`: processes node_rank > 0 of a group run none).
void load_model_only(const Args &args, LoadedModel &out);
// Sampling options of `generate`: --temperature --top-k --top-p --min-p --repetition-penalty
// --presence-penalty --frequency-penalty --seed --max-tokens.
dbrx_sampling_params sampling_from_args(const Args &args);

int cmd_generate(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_throughput(int argc, char **argv);
// `dbrx bench --synthetic dbrx --tp N [--ep N]`: the sharded CUDA backend (bench_cuda_dist.cpp).
int run_bench_dist(int argc, char **argv);
// `dbrx serve-rank`: process node_rank > 0 of a multi-process group (serve_rank.cpp).
int cmd_serve_rank(int argc, char **argv);

}  // namespace dbrx::cli
