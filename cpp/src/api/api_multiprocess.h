// Serving across processes (one per host, or per GPU): process 0 runs the engine and leads the
// others over the step channel (dist/step_leader.h); processes 1 .. P-1 run dbrx_model_serve
// (dist/step_follower.h). Here: the part of dbrx_model_load that sets this up.
#pragma once

#include <memory>

#include "api/api_parallel.h"
#include "api/handles.h"
#include "model/backend.h"

namespace dbrx::api {

// The CUDA backend of a model. One process: make_parallel_cuda_backend as it is. Several
// (layout.rendezvous.world_size > 1): first the step channel on the rendezvous address (process 0
// listens, the others connect; before NCCL's rendezvous, which reuses the port), then the backend;
// process 0's is wrapped in a LeaderBackend, the others keep their connection in model.follower.
std::unique_ptr<Backend> load_cuda_backend(dbrx_model &model, const BackendOptions &options,
                                           const ParallelLayout &layout, bool (*progress)(float, void *),
                                           void *progress_user);

}  // namespace dbrx::api
