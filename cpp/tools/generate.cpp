// dbrx generate: prompt ids in, generated ids out (one line, space separated).
#include <cstdio>
#include <vector>

#include "cli.h"

namespace dbrx::cli {

int cmd_generate(int argc, char **argv) {
    Args args(argc, argv, 2, {"ignore-eos", "batch-invariant"});
    std::vector<int32_t> prompt = parse_ids(args.required("prompt-ids"), "--prompt-ids");
    dbrx_sampling_params sampling = sampling_from_args(args);
    LoadedModel m;
    load_model(args, dbrx_engine_default_params(), m);
    args.reject_unknown();

    uint64_t id = 0;
    check(dbrx_engine_submit(m.engine, prompt.data(), static_cast<int32_t>(prompt.size()), &sampling, &id),
          "submitting the prompt");
    // Stream ids as they come, so a long generation shows progress.
    std::vector<dbrx_token> tokens(64);
    dbrx_finish_reason finish = DBRX_FINISH_NONE;
    bool first = true;
    while (finish == DBRX_FINISH_NONE) {
        int32_t n = 0;
        dbrx_status s = dbrx_engine_poll(m.engine, id, -1, tokens.data(), static_cast<int32_t>(tokens.size()), &n, &finish);
        if (s != DBRX_OK && s != DBRX_ERR_TIMEOUT) check(s, "generating");
        for (int32_t i = 0; i < n; ++i) {
            std::printf(first ? "%d" : " %d", tokens[i].id);
            first = false;
        }
        std::fflush(stdout);
    }
    std::printf("\n");
    if (finish == DBRX_FINISH_ERROR) throw ApiError(DBRX_ERR_INTERNAL, std::string("generation failed: ") + dbrx_last_error());
    dbrx_engine_release(m.engine, id);
    return 0;
}

}  // namespace dbrx::cli
