// Continuous batching over a paged KV cache. Each step: running decodes first, then running
// prefills in chunks, then waiting requests first come first served, all within a token budget.
// When blocks run out the newest running request is preempted: its blocks go back to the pool and
// it is recomputed later from prompt + generated tokens (prefix-cache hits included), so its output
// is unchanged. Single-threaded: the engine calls it under its mutex.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "engine/request.h"
#include "kv/block_allocator.h"

namespace dbrx {

struct ScheduledSeq {
    std::shared_ptr<Request> request;
    int32_t pos0 = 0;     // tokens already in the KV cache
    int32_t n_new = 0;    // tokens computed this step
    bool want_logits() const {
        return pos0 + n_new == static_cast<int32_t>(request->tokens.size());
    }
};

struct SchedulerCounters {
    int64_t preemptions = 0;
    int64_t prefix_query_tokens = 0;
    int64_t prefix_hit_tokens = 0;
    int64_t prompt_tokens = 0;  // computed (prefilled) tokens, recomputation included
};

class Scheduler {
public:
    Scheduler(BlockAllocator &blocks, int32_t max_batch_tokens, int32_t max_running);

    void enqueue(std::shared_ptr<Request> request);
    // Removes requests whose cancel flag is set, freeing their blocks; returns them.
    std::vector<std::shared_ptr<Request>> take_cancelled();
    // Picks this step's work and gives every picked sequence the blocks it needs.
    std::vector<ScheduledSeq> schedule();
    // After a successful forward: advances n_computed and offers newly full prompt blocks to the prefix cache.
    void commit(const std::vector<ScheduledSeq> &batch);
    // Drops a request (finished or failed) from the running batch or queue and frees its blocks.
    void remove(Request &request);

    size_t n_running() const { return running_.size(); }
    size_t n_waiting() const { return waiting_.size(); }
    bool idle() const { return running_.empty() && waiting_.empty(); }
    const SchedulerCounters &counters() const { return counters_; }

private:
    bool ensure_blocks(Request &request, int32_t n_tokens);
    void free_blocks(Request &request);
    void preempt(Request &request);
    void match_prefix(Request &request);

    BlockAllocator &blocks_;
    int32_t max_batch_tokens_;
    int32_t max_running_;
    std::vector<std::shared_ptr<Request>> running_;  // arrival order
    std::deque<std::shared_ptr<Request>> waiting_;   // preempted requests go back to the front
    SchedulerCounters counters_;
};

}  // namespace dbrx
