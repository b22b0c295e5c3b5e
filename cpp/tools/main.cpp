// dbrx: generate, eval and bench DBRX checkpoints from the command line.
// Errors go to stderr as one line; exit code 2 for bad input or a bad checkpoint, 1 for internal failures.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "bench.h"
#include "cli.h"

namespace {

const char *kUsage =
    "usage: dbrx <command> [options]\n"
    "  generate --model DIR --prompt-ids 1,2,3 [--max-tokens N] [--device cpu|cuda] [--threads N] [--tp N] [--ep N]\n"
    "           [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R]\n"
    "           [--presence-penalty P] [--frequency-penalty F] [--seed S] [--stop-ids 1,2] [--ignore-eos]\n"
    "  eval     --model DIR --cases reference.json --out OUT.json [--device cpu|cuda] [--threads N]\n"
    "           [--concurrency N] [--kv-blocks N] [--repeat K]\n"
    "  bench    --model DIR [--device cpu|cuda] [--prompt-len N] [--gen N] [--batch N]   (real checkpoint)\n"
    "  bench    --synthetic dbrx --layers N ...                                        (CUDA kernels, see --help)\n"
    "  bench    --synthetic dbrx --layers N --tp N [--ep N] [--devices 0,1]                (sharded CUDA backend)\n"
    "  serve-rank --model DIR --device cuda --tp N [--devices 0,1] --rendezvous host:port --nodes P --node-rank R\n"
    "           process R >= 1 of P: runs process 0's steps until it exits (exit 0; 1 when it died)\n"
    "model options, for several GPUs: --device cuda --tp N [--ep N] [--devices 0,1] [--rendezvous host:port]\n"
    "           [--nodes N --node-rank R]   (nodes / node rank default to RANK/WORLD_SIZE, SLURM_*, OMPI_*, PMI_*)\n"
    "           --batch-invariant: each sequence's logits bitwise independent of the batch (slower CUDA prefill)\n";

int exit_code_for(dbrx_status s) {
    switch (s) {
        case DBRX_ERR_INVALID_ARGUMENT:
        case DBRX_ERR_BAD_CHECKPOINT:
        case DBRX_ERR_IO:
        case DBRX_ERR_UNSUPPORTED:
        case DBRX_ERR_QUEUE_FULL:
        case DBRX_ERR_NOT_FOUND:
            return 2;
        default:
            return 1;
    }
}

bool has_option(int argc, char **argv, const char *name) {
    const size_t n = std::strlen(name);
    for (int i = 2; i < argc; ++i)
        if (std::strncmp(argv[i], name, n) == 0 && (argv[i][n] == '\0' || argv[i][n] == '=')) return true;
    return false;
}

bool wants_synthetic(int argc, char **argv) { return has_option(argc, argv, "--synthetic"); }
// --tp / --ep with --synthetic: the sharded CUDA backend's benchmark.
bool wants_sharded(int argc, char **argv) { return has_option(argc, argv, "--tp") || has_option(argc, argv, "--ep"); }

}  // namespace

int main(int argc, char **argv) {
    using namespace dbrx::cli;
    if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
        std::fputs(kUsage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    std::string cmd = argv[1];
    try {
        if (cmd == "generate") return cmd_generate(argc, argv);
        if (cmd == "eval") return cmd_eval(argc, argv);
        if (cmd == "serve-rank") return cmd_serve_rank(argc, argv);
        if (cmd == "bench") {
            if (!wants_synthetic(argc, argv)) return cmd_throughput(argc, argv);
            return wants_sharded(argc, argv) ? run_bench_dist(argc, argv) : run_bench(argc, argv);
        }
        if (cmd == "--version") {
            std::printf("dbrx %s\n", dbrx_version());
            return 0;
        }
        throw UsageError("unknown command '" + cmd + "' (generate, eval, bench, serve-rank)");
    } catch (const UsageError &e) {
        std::fprintf(stderr, "dbrx %s: %s\n", cmd.c_str(), e.what());
        return 2;
    } catch (const ApiError &e) {
        std::fprintf(stderr, "dbrx %s: %s\n", cmd.c_str(), e.what());
        return exit_code_for(e.status);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "dbrx %s: internal error: %s\n", cmd.c_str(), e.what());
        return 1;
    }
}
