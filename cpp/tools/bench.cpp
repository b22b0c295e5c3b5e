// Without the CUDA backend there is nothing to run at synthetic full width: say so.
#include "bench.h"
#include "cli.h"

namespace dbrx::cli {

#ifndef DBRX_WITH_CUDA
int run_bench(int, char **) {
    throw ApiError(DBRX_ERR_UNSUPPORTED,
                   "bench --synthetic runs the CUDA backend's kernels; this build has none (-DDBRX_CUDA=ON)");
}
#endif

}  // namespace dbrx::cli
