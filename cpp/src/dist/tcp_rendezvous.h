// Multi-host bootstrap: process 0 listens on a TCP port, every other process connects (retrying
// until a deadline, since hosts start in any order), says which rank it is, and receives a blob
// from process 0 — the NCCL unique id, in practice. Nothing waits past the deadline: a process
// that never shows up, a duplicate rank or a mismatched world size is a clear error on every
// process still connected, naming the rank and the address.
//
// Ranks here are processes. This runtime runs one process per host driving all of its GPUs, so
// process p of P with G local GPUs owns the NCCL ranks p * G .. p * G + G - 1 (every host the same
// G); one process per GPU is the special case G = 1.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace dbrx::dist {

struct RendezvousConfig {
    std::string host;          // process 0's address (peers connect to it; process 0 listens on all interfaces)
    int32_t port = -1;         // -1: from the environment; 0 on process 0: any free port (tests)
    int32_t rank = -1;         // this process; -1: from the environment
    int32_t world_size = -1;   // processes; -1: from the environment
    std::chrono::milliseconds timeout{std::chrono::minutes(2)};
};

// Fills the fields left unset from the usual launcher variables: MASTER_ADDR, MASTER_PORT, then
// RANK / WORLD_SIZE, else SLURM_PROCID / SLURM_NTASKS, else OMPI_COMM_WORLD_RANK / _SIZE, else
// PMI_RANK / PMI_SIZE. A single process (world_size 1) needs no address. Throws
// DBRX_ERR_INVALID_ARGUMENT naming the missing or malformed setting.
RendezvousConfig resolve_rendezvous(RendezvousConfig given,
                                    const std::function<const char *(const char *)> &getenv_fn = nullptr);

// Process 0's side. Binds at construction, so port() is known before the peers start.
class RendezvousServer {
public:
    // Throws DBRX_ERR_IO naming the port when it cannot be bound.
    RendezvousServer(int32_t port, int32_t world_size, std::chrono::milliseconds timeout);
    ~RendezvousServer();
    RendezvousServer(const RendezvousServer &) = delete;
    RendezvousServer &operator=(const RendezvousServer &) = delete;

    int32_t port() const { return port_; }
    // Waits for ranks 1 .. world_size - 1 and sends each of them `blob`. Throws DBRX_ERR_TIMEOUT
    // naming the ranks that never connected, DBRX_ERR_INVALID_ARGUMENT for a duplicate rank or a
    // mismatched world size; the peers already connected receive the same message.
    void broadcast(std::span<const uint8_t> blob);

private:
    int fd_ = -1;
    int32_t port_ = 0;
    int32_t world_size_;
    std::chrono::milliseconds timeout_;
};

// A peer's side (rank >= 1): connects to host:port, retrying until the timeout, and returns the
// blob. Throws DBRX_ERR_TIMEOUT / DBRX_ERR_IO naming the address, or process 0's error message.
std::vector<uint8_t> rendezvous_receive(const RendezvousConfig &config);

// Either side by rank: process 0 serves `blob` on config.port, the others receive it.
std::vector<uint8_t> rendezvous_exchange(const RendezvousConfig &config, std::span<const uint8_t> blob);

}  // namespace dbrx::dist
