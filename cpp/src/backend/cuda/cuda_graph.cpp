#include "backend/cuda/cuda_graph.h"

#include <cstdio>
#include <exception>
#include <string>

#include "backend/cuda/cuda_util.h"

namespace dbrx::cuda {

GraphExec::~GraphExec() {
    if (e_) cudaGraphExecDestroy(e_);
}

void GraphCache::revalidate(const GraphValidity &v) {
    if (v == validity_) return;
    if (!lru_.empty()) ++stats_.invalidations;
    lru_.clear();
    warm_.clear();
    validity_ = v;
}

void GraphCache::run(const GraphKey &key, cudaStream_t stream, const std::function<GraphValidity()> &validity,
                     const std::function<void()> &record) {
    revalidate(validity());
    if (failed_.count(key) == 0) {
        for (auto it = lru_.begin(); it != lru_.end(); ++it) {
            if (!(it->key == key)) continue;
            lru_.splice(lru_.begin(), lru_, it);
            DBRX_CUDA_CHECK(cudaGraphLaunch(lru_.front().exec.get(), stream));
            ++stats_.replays;
            return;
        }
        if (warm_.count(key) != 0 && capture(key, stream, record)) {
            // Addresses that moved while capturing make this graph and every other one stale; the
            // step then runs eagerly below.
            if (validity() == validity_) {
                DBRX_CUDA_CHECK(cudaGraphLaunch(lru_.front().exec.get(), stream));
                ++stats_.replays;
                return;
            }
            revalidate(validity());
        }
    }
    record();
    ++stats_.eager;
    revalidate(validity());  // the eager run may have grown buffers
    warm_.insert(key);
}

bool GraphCache::capture(const GraphKey &key, cudaStream_t stream, const std::function<void()> &record) {
    // Thread-local mode: other threads (other devices' backends) stay free to call unsafe APIs, and
    // an allocation on this thread during the capture fails it instead of going unnoticed.
    cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    if (err != cudaSuccess) {
        cudaGetLastError();
        fail(key, (std::string("cudaStreamBeginCapture: ") + cudaGetErrorString(err)).c_str());
        return false;
    }
    std::string why;
    try {
        record();
    } catch (const std::exception &e) {
        why = e.what();
    }
    cudaGraph_t graph = nullptr;
    err = cudaStreamEndCapture(stream, &graph);  // always ends the capture, also after a throw
    if (why.empty() && err != cudaSuccess) why = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(err);
    cudaGraphExec_t exec = nullptr;
    if (why.empty()) {
        err = cudaGraphInstantiate(&exec, graph, 0);
        if (err != cudaSuccess) {
            exec = nullptr;
            why = std::string("cudaGraphInstantiate: ") + cudaGetErrorString(err);
        }
    }
    if (graph) cudaGraphDestroy(graph);
    if (!why.empty()) {
        cudaGetLastError();  // capture errors are not sticky; clear them for the eager run
        fail(key, why.c_str());
        return false;
    }
    lru_.push_front(Entry{key, GraphExec(exec)});
    ++stats_.captures;
    while (lru_.size() > capacity_) {
        lru_.pop_back();
        ++stats_.evictions;
    }
    return true;
}

void GraphCache::fail(const GraphKey &key, const char *why) {
    ++stats_.failures;
    failed_.insert(key);
    if (reported_) return;
    reported_ = true;
    std::fprintf(stderr,
                 "dbrx: CUDA graph capture failed for a step of %d tokens (%d logits rows, context bucket %d): %s; "
                 "steps of that shape run without graphs (further failures are not reported)\n",
                 key.n_tokens, key.n_out, key.ctx_bucket, why);
}

void GraphCache::clear() {
    lru_.clear();
    warm_.clear();
    failed_.clear();
}

GraphStats GraphCache::stats() const {
    GraphStats s = stats_;
    s.cached = static_cast<int64_t>(lru_.size());
    return s;
}

}  // namespace dbrx::cuda
