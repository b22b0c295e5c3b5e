// The interface every compute backend (CPU reference, CUDA) implements: one forward step of the
// DBRX model over a batch of sequences whose keys and values live in a paged KV pool. The engine
// (scheduler, block allocation, sampling) sits above this and knows nothing of devices.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "io/checkpoint.h"
#include "util/error.h"

namespace dbrx {

// One sequence's share of a step: a prefill chunk (n tokens) or a decode (1 token).
struct SeqStep {
    std::span<const int32_t> tokens;  // the new tokens, at positions pos0 .. pos0 + size - 1
    int32_t pos0 = 0;                 // tokens of this sequence already in the KV cache
    std::span<const int32_t> blocks;  // block table: block i holds positions [i*bs, (i+1)*bs);
                                      // covers at least pos0 + tokens.size() positions
    bool want_logits = false;         // produce the logits of the last new token
};

// Sampling on the device (forward_summarized): per output row, what the engine needs ...
struct LogitsNeed {
    int32_t top_n = 0;         // candidates wanted, 0 .. kMaxLogitsCandidates
    float temperature = 0.0f;  // > 0: sum_exp_t is wanted too
};

inline constexpr int32_t kMaxLogitsCandidates = 64;

// ... and what the backend returns: one row l[0 .. vocab) of fp32 logits reduced. Sums are in
// double, relative to the row's maximum (log-sum-exp = max + log(sum)), and within a relative
// 1e-10 of the exact sum whatever the summation order; everything else is exact.
struct LogitsSummary {
    float max_logit = 0;         // largest finite l; -inf when none is finite
    int32_t n_finite = 0;        // finite logits
    int32_t n_nan_or_pos_inf = 0;
    int32_t n_candidates = 0;    // min(top_n, vocab)
    double sum_exp = 0;          // sum of exp(l - max_logit) over finite l
    // With s = l * (1.0f / temperature) in fp32 (as Sampler scales): sum of exp(s - max s) over
    // finite s; 0 when temperature == 0.
    double sum_exp_t = 0;
    // The first n_candidates ids of the row ordered by l descending, ties by lower id, NaN last.
    int32_t ids[kMaxLogitsCandidates];
    float logits[kMaxLogitsCandidates];
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
    // forward() that keeps the logits on the device and returns one summary per output row (needs
    // and out: one entry per step with want_logits, in batch order). Returns false, having done
    // nothing, when the backend cannot summarise (the default): the engine then calls forward().
    virtual bool forward_summarized(KvPool &, std::span<const SeqStep>, std::span<const LogitsNeed>,
                                    std::span<LogitsSummary>) {
        return false;
    }
    // After forward_summarized returned true: copies output row i ([vocab] floats) to dst. Valid
    // until the next forward or forward_summarized.
    virtual void fetch_logits_row(int32_t i, float *) {
        fail(DBRX_ERR_INTERNAL, "backend " + name() + ": fetch_logits_row(" + std::to_string(i) +
                                    ") without a summarised step");
    }
};

struct BackendOptions {
    int32_t n_threads = 0;  // CPU: 0 = hardware concurrency
    int32_t device_id = 0;  // CUDA
    // Parallel layout (dist/shard_plan.h): tp x ep ranks; 1 x 1 = one unsharded backend.
    int32_t tp = 1;
    int32_t ep = 1;
    // Logits of a sequence bitwise independent of the rest of the batch (dbrx_model_params).
    bool batch_invariant = false;
};

// The checkpoint must outlive the backend (the CPU backend reads the mmapped weights in place).
// CPU: fp32 arithmetic (kernels in backend/cpu/kernels.h); kv_memory_available() is a fixed 2 GiB of
// host RAM; logits are bitwise independent of batch, chunking, block placement and thread count.
std::unique_ptr<Backend> make_cpu_backend(const Checkpoint &ckpt, const BackendOptions &options);
// Throws DBRX_ERR_UNSUPPORTED when the build has no CUDA backend or no device is visible.
std::unique_ptr<Backend> make_cuda_backend(const Checkpoint &ckpt, const BackendOptions &options,
                                           bool (*progress)(float, void *), void *progress_user);

}  // namespace dbrx
