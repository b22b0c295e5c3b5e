#include "api/api_parallel.h"

#include <algorithm>
#include <charconv>
#include <string>

#include "util/error.h"

namespace dbrx::api {
namespace {

std::string num(int64_t v) { return std::to_string(v); }

// "host:port" (an IPv6 host in brackets: "[::1]:port").
void parse_address(const std::string &text, dist::RendezvousConfig &out) {
    const std::string where = "params.rendezvous = \"" + text + "\": ";
    const size_t colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == text.size())
        invalid_argument(where + "expected host:port");
    std::string host = text.substr(0, colon);
    if (host.front() == '[') {
        if (host.size() < 3 || host.back() != ']') invalid_argument(where + "unbalanced brackets around the host");
        host = host.substr(1, host.size() - 2);
    } else if (host.find(':') != std::string::npos) {
        invalid_argument(where + "an IPv6 host goes in brackets, e.g. [::1]:29500");
    }
    if (host.find_first_of(" \t/") != std::string::npos) invalid_argument(where + "the host has spaces or slashes");
    const std::string port_text = text.substr(colon + 1);
    int32_t port = 0;
    const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc() || end != port_text.data() + port_text.size() || port < 1 || port > 65535)
        invalid_argument(where + "the port must be an integer in [1, 65535]");
    out.host = host;
    out.port = port;
}

}  // namespace

ParallelLayout parallel_layout(const dbrx_model_params &p, int32_t device,
                               const std::function<const char *(const char *)> &getenv_fn) {
    if (p.tensor_parallel < 1 || p.expert_parallel < 1)
        invalid_argument("params.tensor_parallel and expert_parallel must be >= 1, got " + num(p.tensor_parallel) +
                         " and " + num(p.expert_parallel));
    if (p.n_devices < 0 || p.n_devices > DBRX_MAX_DEVICES)
        invalid_argument("params.n_devices must be in [0, " + num(DBRX_MAX_DEVICES) + "], got " + num(p.n_devices));
    ParallelLayout out;
    for (int32_t i = 0; i < p.n_devices; ++i) {
        if (p.devices[i] < 0)
            invalid_argument("params.devices[" + num(i) + "] = " + num(p.devices[i]) + " is not a CUDA device ordinal");
        if (std::find(out.devices.begin(), out.devices.end(), p.devices[i]) != out.devices.end())
            invalid_argument("params.devices lists GPU " + num(p.devices[i]) + " twice (one rank per GPU)");
        out.devices.push_back(p.devices[i]);
    }
    if (p.n_nodes == 0 || p.n_nodes < -1)
        invalid_argument("params.n_nodes must be >= 1 or -1 (the launcher's), got " + num(p.n_nodes) +
                         " (start from dbrx_model_default_params())");
    if (p.node_rank < -1) invalid_argument("params.node_rank must be >= 0 or -1, got " + num(p.node_rank));
    if (p.n_nodes > 0 && p.node_rank >= p.n_nodes)
        invalid_argument("params.node_rank " + num(p.node_rank) + " outside [0, n_nodes " + num(p.n_nodes) + ")");
    out.rendezvous.rank = p.node_rank;
    out.rendezvous.world_size = p.n_nodes;
    if (p.rendezvous != nullptr && p.rendezvous[0] != '\0') parse_address(p.rendezvous, out.rendezvous);

    const int64_t world = int64_t{p.tensor_parallel} * p.expert_parallel;
    if (device == DBRX_DEVICE_CPU) {
        if (p.n_devices > 0) invalid_argument("params.devices name GPUs, but params.device is DBRX_DEVICE_CPU");
        if (p.n_nodes > 1)
            fail(DBRX_ERR_UNSUPPORTED, "params.n_nodes = " + num(p.n_nodes) +
                                           ": the sharded CPU backend runs in one process (use DBRX_DEVICE_CUDA)");
        return out;
    }
    if (world == 1 && p.n_nodes <= 1) {
        if (p.n_devices > 1)
            invalid_argument("params.n_devices = " + num(p.n_devices) +
                             " but tensor_parallel * expert_parallel = 1 (one rank runs on one GPU)");
        return out;
    }
    out.rendezvous = dist::resolve_rendezvous(out.rendezvous, getenv_fn);
    const int64_t nodes = out.rendezvous.world_size;
    if (world % nodes != 0)
        invalid_argument("tensor_parallel * expert_parallel = " + num(world) + " ranks cannot be split evenly over " +
                         num(nodes) + " processes (n_nodes)");
    if (p.n_devices > 0 && world != nodes * p.n_devices)
        invalid_argument("tensor_parallel * expert_parallel = " + num(world) + " but n_nodes * n_devices = " +
                         num(nodes) + " * " + num(p.n_devices) + " = " + num(nodes * p.n_devices) +
                         " GPUs (one rank per GPU)");
    if (world / nodes > DBRX_MAX_DEVICES)
        invalid_argument(num(world / nodes) + " GPUs per process exceed DBRX_MAX_DEVICES (" + num(DBRX_MAX_DEVICES) + ")");
    return out;
}

}  // namespace dbrx::api
