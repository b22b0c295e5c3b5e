// What the C API's opaque handles hold. A model owns its checkpoint (the mmapped weights) and the
// backend computing over it; an engine runs on one model, which must outlive it.
#pragma once

#include <memory>

#include "dbrx/dbrx.h"
#include "dist/step_channel.h"
#include "dist/step_leader.h"
#include "engine/engine.h"
#include "io/checkpoint.h"
#include "io/model_config.h"
#include "model/backend.h"

struct dbrx_model {
    std::unique_ptr<dbrx::Checkpoint> checkpoint;  // null for models built around a test backend
    std::unique_ptr<dbrx::Backend> backend;        // declared after the checkpoint: destroyed first
    dbrx::ModelConfig config;
    int64_t weight_bytes = 0;
    dbrx_device device = DBRX_DEVICE_CPU;
    // Process node_rank > 0 of a multi-process group: it runs no engine, only dbrx_model_serve, which
    // reads process 0's commands from `follower` (taken by the first call). Declared last: closed first.
    bool is_follower = false;
    int32_t node_rank = 0, n_nodes = 1;
    dbrx::dist::StepGroupOptions group;
    std::unique_ptr<dbrx::dist::StepConnection> follower;
};

struct dbrx_engine {
    dbrx_model *model = nullptr;
    std::unique_ptr<dbrx::Engine> engine;
};
