// dbrx serve-rank: process node_rank >= 1 of a multi-process group. It loads its share of the
// ranks, then runs the KV pools and forward steps process 0 sends (dbrx_model_serve) until process
// 0 frees its model: exit 0; exit 1 when process 0 died or the channel broke (ENGINE_DEAD).
#include <cstdio>

#include "cli.h"

namespace dbrx::cli {

int cmd_serve_rank(int argc, char **argv) {
    Args args(argc, argv, 2, {});
    if (args.has("node-rank") && args.integer("node-rank", -1, 0, 65535) == 0)
        throw UsageError("--node-rank 0 is process 0, which runs the engine (generate, eval, or a server); "
                         "serve-rank runs the others, 1 .. nodes-1");
    if (args.str("device", "cpu") != "cuda") throw UsageError("serve-rank needs --device cuda (GPUs over NCCL)");
    LoadedModel m;
    load_model_only(args, m);
    args.reject_unknown();
    std::fprintf(stderr, "dbrx serve-rank: loaded %s; serving process 0's steps\n", args.str("model").c_str());
    check(dbrx_model_serve(m.model), "serving process 0");
    std::fprintf(stderr, "dbrx serve-rank: process 0 shut the group down\n");
    return 0;
}

}  // namespace dbrx::cli
