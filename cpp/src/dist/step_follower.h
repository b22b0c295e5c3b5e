// Processes 1 .. P-1 of a multi-process group (the followers): no engine, only a loop that runs the
// commands process 0 sends over the step channel (dist/step_leader.h) on this process's ranks, so
// their collectives meet process 0's. dbrx_model_serve() is this loop.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "dist/step_channel.h"
#include "dist/step_leader.h"
#include "model/backend.h"

namespace dbrx::dist {

struct FollowerStats {
    int64_t steps = 0;         // forward steps run (summarised ones included)
    int64_t failed_steps = 0;  // steps that failed for their batch only (process 0 failed them the same way)
    int64_t pools = 0;         // KV pools created
};

// Runs process 0's commands on `backend` until process 0 sends Shutdown, then returns (the pools it
// created are freed). Logits are computed (the collectives need it) and discarded: n_vocab sizes
// them. abort_group (may be empty) fails the backend's collectives from another thread; it runs when
// process 0 closes the channel while a step is running here, and before anything is thrown.
//
// Throws DBRX_ERR_ENGINE_DEAD naming process 0 when its connection closes without a Shutdown,
// breaks, carries a bad frame, or stays silent (not even a heartbeat) past options.idle_timeout; and
// when a step fails here with ENGINE_DEAD (process 0 is told why first, so its steps fail at once).
FollowerStats serve_follower(StepConnection &leader, Backend &backend, int32_t n_vocab,
                             const std::function<void(const std::string &)> &abort_group,
                             const StepGroupOptions &options);

}  // namespace dbrx::dist
