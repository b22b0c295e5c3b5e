#include "engine/scheduler.h"

#include <algorithm>
#include <string>

#include "util/error.h"

namespace dbrx {

Scheduler::Scheduler(BlockAllocator &blocks, int32_t max_batch_tokens, int32_t max_running)
    : blocks_(blocks), max_batch_tokens_(max_batch_tokens), max_running_(max_running) {}

void Scheduler::enqueue(std::shared_ptr<Request> request) { waiting_.push_back(std::move(request)); }

std::vector<std::shared_ptr<Request>> Scheduler::take_cancelled() {
    std::vector<std::shared_ptr<Request>> out;
    auto sweep = [&](auto &queue) {
        for (auto it = queue.begin(); it != queue.end();) {
            if ((*it)->cancel_requested) {
                free_blocks(**it);
                (*it)->admitted = false;
                out.push_back(std::move(*it));
                it = queue.erase(it);
            } else {
                ++it;
            }
        }
    };
    sweep(running_);
    sweep(waiting_);
    return out;
}

bool Scheduler::ensure_blocks(Request &r, int32_t n_tokens) {
    const int32_t bs = blocks_.block_size();
    const size_t need = static_cast<size_t>((n_tokens + bs - 1) / bs);
    while (r.blocks.size() < need) {
        auto b = blocks_.allocate();
        if (!b) return false;
        r.blocks.push_back(*b);
    }
    return true;
}

void Scheduler::free_blocks(Request &r) {
    // Released last block first, so the LRU order evicts a chain's tail before its head.
    for (auto it = r.blocks.rbegin(); it != r.blocks.rend(); ++it) blocks_.release(*it);
    r.blocks.clear();
    r.n_computed = 0;
    r.n_registered = 0;
}

void Scheduler::preempt(Request &r) {
    auto it = std::find_if(running_.begin(), running_.end(), [&](const auto &p) { return p.get() == &r; });
    if (it == running_.end()) fail(DBRX_ERR_INTERNAL, "scheduler: preempting a request that is not running");
    std::shared_ptr<Request> keep = std::move(*it);
    running_.erase(it);
    free_blocks(r);
    r.admitted = false;
    waiting_.push_front(std::move(keep));
    ++counters_.preemptions;
}

void Scheduler::match_prefix(Request &r) {
    // Only full prompt blocks are shared, and at least one token is left to compute: the step
    // that computes it produces the logits of the next token.
    const int32_t bs = blocks_.block_size();
    const size_t limit = std::min(r.prompt_block_keys.size(), static_cast<size_t>((r.tokens.size() - 1) / bs));
    std::span<const int32_t> tokens(r.tokens);
    for (size_t i = 0; i < limit; ++i) {
        auto b = blocks_.lookup(r.prompt_block_keys[i], tokens.subspan(i * bs, bs));
        if (!b) break;
        r.blocks.push_back(*b);
    }
    r.n_computed = static_cast<int32_t>(r.blocks.size()) * bs;
    r.n_registered = static_cast<int32_t>(r.blocks.size());
}

std::vector<ScheduledSeq> Scheduler::schedule() {
    std::vector<ScheduledSeq> batch;
    int32_t budget = max_batch_tokens_;
    bool preempted = false;

    // Running sequences: decodes first (one token each), then unfinished prefills, in arrival order.
    std::vector<std::shared_ptr<Request>> order;
    for (auto &r : running_)
        if (r->tokens.size() - r->n_computed == 1) order.push_back(r);
    for (auto &r : running_)
        if (r->tokens.size() - r->n_computed > 1) order.push_back(r);

    for (auto &r : order) {
        if (!r->admitted) continue;  // preempted earlier in this loop
        if (budget == 0) break;
        const int32_t n = std::min<int32_t>(static_cast<int32_t>(r->tokens.size()) - r->n_computed, budget);
        bool ok = true;
        while (!ensure_blocks(*r, r->n_computed + n)) {
            Request &victim = *running_.back();
            auto in_batch = std::find_if(batch.begin(), batch.end(), [&](const auto &s) { return s.request.get() == &victim; });
            if (in_batch != batch.end()) {
                budget += in_batch->n_new;
                batch.erase(in_batch);
            }
            preempt(victim);
            preempted = true;
            if (&victim == r.get()) {
                ok = false;
                break;
            }
        }
        if (!ok) continue;
        batch.push_back({r, r->n_computed, n});
        budget -= n;
    }

    // New and preempted requests, first come first served; none while this step had to preempt.
    while (!preempted && budget > 0 && !waiting_.empty() && running_.size() < static_cast<size_t>(max_running_)) {
        Request &r = *waiting_.front();
        match_prefix(r);
        const int32_t n = std::min<int32_t>(static_cast<int32_t>(r.tokens.size()) - r.n_computed, budget);
        if (!ensure_blocks(r, r.n_computed + n)) {
            free_blocks(r);  // wait with no blocks held, so nothing it matched is pinned
            break;
        }
        counters_.prefix_query_tokens += r.n_prompt;
        counters_.prefix_hit_tokens += r.n_computed;
        std::shared_ptr<Request> req = std::move(waiting_.front());
        waiting_.pop_front();
        req->admitted = true;
        auto pos = std::upper_bound(running_.begin(), running_.end(), req->arrival,
                                    [](uint64_t a, const auto &p) { return a < p->arrival; });
        running_.insert(pos, req);
        batch.push_back({req, req->n_computed, n});
        budget -= n;
    }
    return batch;
}

void Scheduler::commit(const std::vector<ScheduledSeq> &batch) {
    const int32_t bs = blocks_.block_size();
    for (const auto &s : batch) {
        Request &r = *s.request;
        r.n_computed = s.pos0 + s.n_new;
        const bool decode = s.n_new == 1 && s.pos0 >= r.n_prompt;
        if (!decode) counters_.prompt_tokens += s.n_new;
        const int32_t full = std::min<int32_t>(r.n_computed / bs, static_cast<int32_t>(r.prompt_block_keys.size()));
        std::span<const int32_t> tokens(r.tokens);
        for (; r.n_registered < full; ++r.n_registered) {
            const size_t i = static_cast<size_t>(r.n_registered);
            blocks_.register_prefix(r.blocks[i], r.prompt_block_keys[i], tokens.subspan(i * bs, bs));
        }
    }
}

void Scheduler::remove(Request &r) {
    auto match = [&](const auto &p) { return p.get() == &r; };
    if (auto it = std::find_if(running_.begin(), running_.end(), match); it != running_.end()) running_.erase(it);
    if (auto it = std::find_if(waiting_.begin(), waiting_.end(), match); it != waiting_.end()) waiting_.erase(it);
    free_blocks(r);
    r.admitted = false;
}

}  // namespace dbrx
