// Built when the CUDA backend is not compiled in: asking for it is an honest error.
#include "model/backend.h"
#include "util/error.h"

namespace dbrx {

std::unique_ptr<Backend> make_cuda_backend(const Checkpoint &, const BackendOptions &, bool (*)(float, void *), void *) {
    fail(DBRX_ERR_UNSUPPORTED, "this build of libdbrx has no CUDA backend (rebuild with -DDBRX_CUDA=ON)");
}

}  // namespace dbrx
