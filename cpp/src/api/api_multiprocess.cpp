// C API: multi-process groups (api_multiprocess.h) and dbrx_model_serve.
#include "api/api_multiprocess.h"

#include <string>

#include "api/api_guard.h"
#include "dist/sharded_cuda_backend.h"
#include "dist/step_follower.h"

namespace dbrx::api {
namespace {

// Fails the collectives of this process's ranks (what a lost peer process calls for).
std::function<void(const std::string &)> group_abort(Backend &backend) {
    auto *sharded = dynamic_cast<dist::ShardedCudaBackend *>(&backend);
    if (!sharded) return {};
    return [sharded](const std::string &why) { sharded->abort(why); };
}

}  // namespace

std::unique_ptr<Backend> load_cuda_backend(dbrx_model &model, const BackendOptions &options,
                                           const ParallelLayout &layout, bool (*progress)(float, void *),
                                           void *progress_user) {
    const dist::RendezvousConfig &rv = layout.rendezvous;
    if (rv.world_size <= 1)
        return dist::make_parallel_cuda_backend(*model.checkpoint, options, layout.devices, rv, progress, progress_user);
    model.n_nodes = rv.world_size;
    model.node_rank = rv.rank;
    if (rv.rank == 0) {
        dist::StepChannelListener listener(rv.port, rv.world_size, rv.timeout);
        // Heartbeats start now, so followers done loading before process 0 do not give up on it.
        auto link = std::make_shared<dist::LeaderLink>(listener.accept_all(), model.group);
        auto inner = dist::make_parallel_cuda_backend(*model.checkpoint, options, layout.devices, rv, progress,
                                                      progress_user);
        auto abort = group_abort(*inner);
        return std::make_unique<dist::LeaderBackend>(std::move(inner), std::move(abort), std::move(link));
    }
    model.follower = dist::connect_step_channel(rv.host, rv.port, rv.rank, rv.world_size, rv.timeout);
    model.is_follower = true;
    return dist::make_parallel_cuda_backend(*model.checkpoint, options, layout.devices, rv, progress, progress_user);
}

}  // namespace dbrx::api

using dbrx::api::guarded;
using dbrx::api::require;

extern "C" {

DBRX_API dbrx_status dbrx_model_serve(dbrx_model *model) {
    return guarded("dbrx_model_serve", [&] {
        require(model, "model");
        if (!model->is_follower)
            dbrx::invalid_argument("the model is process 0 of its group, or a single process: it runs an engine "
                                   "(dbrx_engine_create); dbrx_model_serve is for processes with node_rank > 0");
        if (!model->follower)
            dbrx::invalid_argument("dbrx_model_serve already ran on this model (its channel to process 0 is closed); "
                                   "free it");
        // Closed when serving ends, however it ends: process 0 then knows this process stopped.
        std::unique_ptr<dbrx::dist::StepConnection> channel = std::move(model->follower);
        dbrx::dist::serve_follower(*channel, *model->backend, model->config.vocab_size,
                                   dbrx::api::group_abort(*model->backend), model->group);
    });
}

}  // extern "C"
