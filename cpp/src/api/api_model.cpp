// C API: errors, version, device query, model loading.
#include <algorithm>
#include <cstring>
#include <string>

#include "api/api_guard.h"
#include "api/handles.h"
#include "api/api_multiprocess.h"
#include "api/api_parallel.h"
#include "dist/sharded_cpu_backend.h"
#include "dist/sharded_cuda_backend.h"

#ifdef DBRX_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace dbrx::api {

namespace {
thread_local std::string g_last_error;
}

void set_last_error(const std::string &message) {
    try {
        g_last_error = message;
    } catch (...) {
        g_last_error.clear();  // no memory even for the message: an empty text beats a throw
    }
}

}  // namespace dbrx::api

using dbrx::api::guarded;
using dbrx::api::require;

extern "C" {

DBRX_API const char *dbrx_last_error(void) { return dbrx::api::g_last_error.c_str(); }

DBRX_API const char *dbrx_status_name(dbrx_status status) {
    int32_t code = 0;  // any integer a C caller passes, without loading it as the enum
    static_assert(sizeof(code) == sizeof(status));
    std::memcpy(&code, &status, sizeof(code));
    switch (code) {
        case DBRX_OK: return "OK";
        case DBRX_ERR_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
        case DBRX_ERR_BAD_CHECKPOINT: return "BAD_CHECKPOINT";
        case DBRX_ERR_IO: return "IO";
        case DBRX_ERR_OUT_OF_MEMORY: return "OUT_OF_MEMORY";
        case DBRX_ERR_UNSUPPORTED: return "UNSUPPORTED";
        case DBRX_ERR_QUEUE_FULL: return "QUEUE_FULL";
        case DBRX_ERR_NOT_FOUND: return "NOT_FOUND";
        case DBRX_ERR_TIMEOUT: return "TIMEOUT";
        case DBRX_ERR_ENGINE_DEAD: return "ENGINE_DEAD";
        case DBRX_ERR_INTERNAL: return "INTERNAL";
    }
    return "UNKNOWN_STATUS";
}

DBRX_API const char *dbrx_version(void) { return "0.1.0"; }

DBRX_API bool dbrx_cuda_available(void) {
#ifdef DBRX_WITH_CUDA
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
#else
    return false;
#endif
}

DBRX_API dbrx_model_params dbrx_model_default_params(void) {
    dbrx_model_params p{};
    p.device = DBRX_DEVICE_CPU;
    p.device_id = 0;
    p.n_threads = 0;
    p.tensor_parallel = 1;
    p.expert_parallel = 1;
    p.progress = nullptr;
    p.progress_user_data = nullptr;
    p.batch_invariant = false;
    p.n_devices = 0;
    std::fill_n(p.devices, DBRX_MAX_DEVICES, 0);
    p.rendezvous = nullptr;
    p.n_nodes = -1;
    p.node_rank = -1;
    return p;
}

DBRX_API dbrx_status dbrx_model_load(const char *dir, const dbrx_model_params *params, dbrx_model **out) {
    return guarded("dbrx_model_load", [&] {
        require(out, "out");
        *out = nullptr;
        require(dir, "dir");
        require(params, "params");
        const dbrx_model_params &p = *params;
        // Read as an integer: a C caller may pass any value, which C++ may not load as the enum.
        int32_t device = 0;
        static_assert(sizeof(device) == sizeof(p.device));
        std::memcpy(&device, &p.device, sizeof(device));
        if (device != DBRX_DEVICE_CPU && device != DBRX_DEVICE_CUDA)
            dbrx::invalid_argument("params.device = " + std::to_string(device) + " is not a dbrx_device");
        if (p.n_threads < 0) dbrx::invalid_argument("params.n_threads must be >= 0, got " + std::to_string(p.n_threads));
        if (p.device_id < 0) dbrx::invalid_argument("params.device_id must be >= 0, got " + std::to_string(p.device_id));
        // tp, ep, devices, rendezvous, n_nodes, node_rank: checked before anything is loaded.
        const dbrx::api::ParallelLayout layout = dbrx::api::parallel_layout(p, device);
        if (p.batch_invariant && device == DBRX_DEVICE_CUDA && p.tensor_parallel * p.expert_parallel > 1)
            dbrx::fail(DBRX_ERR_UNSUPPORTED, "params.batch_invariant is not available with tensor/expert parallelism on "
                                             "CUDA (the CPU backend is always batch-invariant)");
        auto report = [&](float progress) {
            if (p.progress != nullptr && !p.progress(progress, p.progress_user_data))
                dbrx::invalid_argument("load of " + std::string(dir) + " aborted by the progress callback");
        };
        report(0.0f);
        auto model = std::make_unique<dbrx_model>();
        model->checkpoint = dbrx::Checkpoint::open(dir);
        model->config = model->checkpoint->config();
        model->weight_bytes = model->checkpoint->weight_bytes();
        model->device = p.device;
        dbrx::BackendOptions options;
        options.n_threads = p.n_threads;
        options.device_id = p.device_id;
        options.tp = p.tensor_parallel;
        options.ep = p.expert_parallel;
        options.batch_invariant = p.batch_invariant;
        if (p.device == DBRX_DEVICE_CPU) {
            // One rank: the plain CPU backend; tp x ep > 1: ranks as threads of this process.
            model->backend = dbrx::dist::make_parallel_cpu_backend(*model->checkpoint, options);
        } else {
            // One rank: the plain CUDA backend; tp x ep > 1: one rank per GPU over NCCL.
            // Several processes: process 0 also leads the others over the step channel (api_multiprocess.h).
            model->backend = dbrx::api::load_cuda_backend(*model, options, layout, p.progress, p.progress_user_data);
        }
        report(1.0f);
        *out = model.release();
    });
}

DBRX_API void dbrx_model_free(dbrx_model *model) { delete model; }

DBRX_API dbrx_status dbrx_model_get_info(const dbrx_model *model, dbrx_model_info *out) {
    return guarded("dbrx_model_get_info", [&] {
        require(model, "model");
        require(out, "out");
        const dbrx::ModelConfig &c = model->config;
        dbrx_model_info info{};
        info.n_vocab = c.vocab_size;
        info.n_ctx_max = c.max_seq_len;
        info.d_model = c.d_model;
        info.n_layers = c.n_layers;
        info.n_heads = c.n_heads;
        info.n_kv_heads = c.n_kv_heads;
        info.head_dim = c.head_dim;
        info.n_experts = c.n_experts;
        info.top_k = c.top_k;
        info.ffn_hidden = c.ffn_hidden;
        info.n_eos = static_cast<int32_t>(std::min<size_t>(c.eos_ids.size(), DBRX_MAX_STOP_IDS));
        std::copy_n(c.eos_ids.begin(), info.n_eos, info.eos_ids);
        info.weight_bytes = model->weight_bytes;
        info.device = model->device;
        *out = info;
    });
}

}  // extern "C"
