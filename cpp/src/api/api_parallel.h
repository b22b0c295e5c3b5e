// The parallel fields of dbrx_model_params (tensor_parallel, expert_parallel, devices, rendezvous,
// n_nodes, node_rank): checked before anything is loaded, with errors naming the field.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "dbrx/dbrx.h"
#include "dist/tcp_rendezvous.h"

namespace dbrx::api {

struct ParallelLayout {
    std::vector<int32_t> devices;      // this process's GPUs (empty: derived from device_id)
    dist::RendezvousConfig rendezvous;  // resolved for CUDA with tp * ep > 1; untouched otherwise
};

// Throws DBRX_ERR_INVALID_ARGUMENT naming the bad field: tp or ep < 1, n_devices outside
// [0, DBRX_MAX_DEVICES], a negative or repeated device, a rendezvous that is not "host:port" with a
// port in [1, 65535], n_nodes or node_rank out of range, devices given for the CPU, or (CUDA)
// tp * ep != n_nodes * n_devices. DBRX_ERR_UNSUPPORTED for several processes on the CPU.
// getenv_fn (tests) replaces std::getenv for the launcher's variables.
ParallelLayout parallel_layout(const dbrx_model_params &p, int32_t device,
                               const std::function<const char *(const char *)> &getenv_fn = nullptr);

}  // namespace dbrx::api
