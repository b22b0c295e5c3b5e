// The serving engine: a paged KV pool on a backend, a scheduler and a sampler driven by one worker
// thread. Callers on any thread submit requests and poll their token queues; the worker never
// calls out to them. Every public method is thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "dbrx/dbrx.h"
#include "engine/request.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "kv/block_allocator.h"
#include "model/backend.h"

namespace dbrx {

struct EngineOptions {
    int32_t n_vocab = 0;
    int32_t max_ctx = 0;                 // per-request limit on prompt + max_tokens
    std::vector<int32_t> eos_ids;        // default stop ids
    int32_t block_size = 16;
    int32_t n_blocks = 0;
    int32_t max_batch_tokens = 2048;
    int32_t max_running = 256;
    int32_t max_waiting = 4096;
    bool enable_prefix_cache = true;
};

// Checks the caller's engine parameters and resolves the pool size: kv_blocks if > 0, else
// kv_cache_bytes, else kv_cache_fraction * backend.kv_memory_available(). Throws INVALID_ARGUMENT
// naming the field, or OUT_OF_MEMORY when the memory given holds no block.
EngineOptions resolve_engine_options(const dbrx_engine_params &params, const Backend &backend, int32_t n_vocab,
                                     int32_t model_max_ctx, std::vector<int32_t> eos_ids);

struct PollResult {
    int32_t n_tokens = 0;
    dbrx_finish_reason finish = DBRX_FINISH_NONE;
    std::string error;       // for DBRX_FINISH_ERROR
    bool timed_out = false;  // nothing new within the timeout
};

class Engine {
public:
    // The backend must outlive the engine.
    Engine(Backend &backend, EngineOptions options);
    ~Engine();
    Engine(const Engine &) = delete;
    Engine &operator=(const Engine &) = delete;

    const EngineOptions &options() const { return options_; }

    uint64_t submit(std::span<const int32_t> prompt, const dbrx_sampling_params &sampling);
    PollResult poll(uint64_t id, int32_t timeout_ms, dbrx_token *out, int32_t cap);
    void prompt_logits(uint64_t id, std::span<float> out);
    void cancel(uint64_t id);
    void release(uint64_t id);
    dbrx_engine_stats stats();
    // True once a fatal backend or engine failure stopped the worker.
    bool dead();

private:
    std::shared_ptr<Request> find(uint64_t id);  // mutex held
    void run();
    // One scheduling step; returns false when there was nothing to do. Called with the lock held,
    // releases it around the backend's forward.
    bool step(std::unique_lock<std::mutex> &lock);
    // One output row's outcome, sampled without the lock (only the worker changes what it reads).
    struct Sampled {
        dbrx_token token{};
        std::string error;               // sampling failed
        std::vector<float> prompt_logits;  // the full row, for the first token of keep_prompt_logits
    };
    // Runs the batch on the backend and samples every output row into sampled_: from the
    // backend's summaries where they prove the token, else from the full row. Backend errors throw.
    void forward_and_sample(const std::vector<ScheduledSeq> &batch, std::span<const SeqStep> steps, size_t rows);
    void emit(Request &request, Sampled &sampled);
    void finish(Request &request, dbrx_finish_reason reason, std::string error = {});
    void die(const std::string &message);

    Backend &backend_;
    EngineOptions options_;
    std::unique_ptr<KvPool> pool_;
    BlockAllocator blocks_;
    Scheduler scheduler_;
    Sampler sampler_;

    std::mutex mu_;
    std::condition_variable work_cv_;      // the worker waits for requests
    std::condition_variable progress_cv_;  // pollers wait for tokens
    std::unordered_map<uint64_t, std::shared_ptr<Request>> requests_;
    uint64_t next_id_ = 1;
    std::mt19937_64 seed_source_;
    bool stopping_ = false;
    bool dead_ = false;
    std::string dead_reason_;

    int64_t steps_ = 0;
    int64_t generated_tokens_ = 0;
    int64_t finished_requests_ = 0;
    bool wake_ = false;  // new work for the worker since it last looked
    std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
    std::deque<std::pair<std::chrono::steady_clock::time_point, int32_t>> recent_;  // (step end, tokens)
    std::vector<float> logits_;           // rows of a plain forward()
    std::vector<float> row_;              // one fetched row after forward_summarized()
    std::vector<LogitsNeed> needs_;
    std::vector<LogitsSummary> summaries_;
    std::vector<Sampled> sampled_;

    std::thread worker_;  // last: starts after everything above exists
};

}  // namespace dbrx
