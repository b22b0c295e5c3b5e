// `dbrx bench --synthetic ...`: kernel and end-to-end benchmarks of the CUDA backend at full DBRX
// width on synthetic weights generated on the GPU (bench*.cpp).
#pragma once

namespace dbrx::cli {

int run_bench(int argc, char **argv);

}  // namespace dbrx::cli
