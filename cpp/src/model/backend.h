// The interface every compute backend (CPU reference, CUDA) implements: one forward step of the
// DBRX model over a batch of sequences whose keys and values live in a paged KV pool. The engine
// (scheduler, block allocation, sampling) sits above this and knows nothing of devices.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "io/checkpoint.h"

namespace dbrx {

// One sequence's share of a step: a prefill chunk (n tokens) or a decode (1 token).
struct SeqStep {
    std::span<const int32_t> tokens;  // the new tokens, at positions pos0 .. pos0 + size - 1
    int32_t pos0 = 0;                 // tokens of this sequence already in the KV cache
    std::span<const int32_t> blocks;  // block table: block i holds positions [i*bs, (i+1)*bs);
                                      // covers at least pos0 + tokens.size() positions
    bool want_logits = false;         // produce the logits of the last new token
};

// Backend-owned KV storage: per layer, per block, block_size x n_kv_heads x head_dim keys and values.
class KvPool {
public:
    virtual ~KvPool() = default;
    virtual int32_t n_blocks() const = 0;
    virtual int32_t block_size() const = 0;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    // Bytes of KV storage one block of block_size tokens takes (all layers, K and V).
    virtual int64_t kv_bytes_per_block(int32_t block_size) const = 0;
    // Memory available for a KV pool when the caller gives only a fraction (device free memory for CUDA).
    virtual int64_t kv_memory_available() const = 0;
    // Throws DBRX_ERR_OUT_OF_MEMORY when the pool cannot be allocated.
    virtual std::unique_ptr<KvPool> create_kv_pool(int32_t n_blocks, int32_t block_size) = 0;
    // Writes the new tokens' K/V into the pool, then writes one row of [vocab] logits per step with
    // want_logits into `logits`, in batch order. The result for a sequence never depends on what
    // else is in the batch. Serialised internally: callers on several threads take turns.
    // A thrown dbrx::Error fails the requests of this batch only, unless its status is
    // DBRX_ERR_ENGINE_DEAD (device state lost, e.g. a sticky CUDA error): then the engine stops.
    virtual void forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) = 0;
};

struct BackendOptions {
    int32_t n_threads = 0;  // CPU: 0 = hardware concurrency
    int32_t device_id = 0;  // CUDA
    // Parallel layout (dist/shard_plan.h): tp x ep ranks; 1 x 1 = one unsharded backend.
    int32_t tp = 1;
    int32_t ep = 1;
};

// The checkpoint must outlive the backend (the CPU backend reads the mmapped weights in place).
// CPU: fp32 arithmetic (kernels in backend/cpu/kernels.h); kv_memory_available() is a fixed 2 GiB of
// host RAM; logits are bitwise independent of batch, chunking, block placement and thread count.
std::unique_ptr<Backend> make_cpu_backend(const Checkpoint &ckpt, const BackendOptions &options);
// Throws DBRX_ERR_UNSUPPORTED when the build has no CUDA backend or no device is visible.
std::unique_ptr<Backend> make_cuda_backend(const Checkpoint &ckpt, const BackendOptions &options,
                                           bool (*progress)(float, void *), void *progress_user);

}  // namespace dbrx
