// CUDA graphs of repeated device work (the CUDA backend's decode step): one graph per shape key,
// captured lazily, replayed while the device addresses it captured stay valid, least recently used
// graphs dropped beyond a capacity. A capture that fails falls back to running the work eagerly.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <set>
#include <tuple>

namespace dbrx::cuda {

// The shape of one step: everything the captured launches depend on besides device addresses.
struct GraphKey {
    int32_t n_tokens = 0;
    int32_t n_out = 0;
    int32_t ctx_bucket = 0;
    auto operator<=>(const GraphKey &) const = default;
};

// What the captured addresses depend on: graphs captured under another validity are dropped.
struct GraphValidity {
    uint64_t allocation_epoch = 0;  // device_allocation_epoch() of the device
    uint64_t kv_pool = 0;           // serial number of the KV pool
    bool operator==(const GraphValidity &) const = default;
};

struct GraphStats {
    int64_t captures = 0;       // graphs captured and instantiated
    int64_t replays = 0;        // graph launches (each runs one step)
    int64_t eager = 0;          // steps of a capturable shape run eagerly (first sight under a validity)
    int64_t failures = 0;       // failed captures (their shapes then always run eagerly)
    int64_t invalidations = 0;  // times the cached graphs were dropped because the validity changed
    int64_t evictions = 0;      // graphs dropped for the capacity
    int64_t cached = 0;         // graphs held now
};

// Owner of one instantiated graph.
class GraphExec {
public:
    explicit GraphExec(cudaGraphExec_t e) : e_(e) {}
    ~GraphExec();
    GraphExec(GraphExec &&o) noexcept : e_(o.e_) { o.e_ = nullptr; }
    GraphExec &operator=(GraphExec &&) = delete;
    GraphExec(const GraphExec &) = delete;
    GraphExec &operator=(const GraphExec &) = delete;
    cudaGraphExec_t get() const { return e_; }

private:
    cudaGraphExec_t e_ = nullptr;
};

class GraphCache {
public:
    explicit GraphCache(size_t capacity) : capacity_(capacity == 0 ? 1 : capacity) {}

    // Runs one step of shape `key` on `stream`. record() enqueues the step's device work on `stream`
    // and must enqueue the same launches, on the same addresses, whenever validity() is unchanged.
    // The first time a shape is seen under the current validity it runs eagerly (which also makes
    // every buffer it touches reach its size and loads its kernels); the second time it is captured
    // and launched; afterwards the graph is replayed. A failed capture is reported once on stderr
    // and its shape runs eagerly from then on; errors of the eager run itself propagate.
    void run(const GraphKey &key, cudaStream_t stream, const std::function<GraphValidity()> &validity,
             const std::function<void()> &record);

    void clear();  // drops every graph and what was learned about shapes
    GraphStats stats() const;

private:
    struct Entry {
        GraphKey key;
        GraphExec exec;
    };
    void revalidate(const GraphValidity &v);  // drops graphs and warm shapes captured under another
    bool capture(const GraphKey &key, cudaStream_t stream, const std::function<void()> &record);
    void fail(const GraphKey &key, const char *why);

    size_t capacity_;
    GraphValidity validity_;
    std::list<Entry> lru_;         // most recently used first
    std::set<GraphKey> warm_;      // shapes run eagerly under validity_
    std::set<GraphKey> failed_;    // shapes whose capture failed
    bool reported_ = false;
    GraphStats stats_;
};

}  // namespace dbrx::cuda
