#include "engine/engine.h"

#include <algorithm>
#include <string>

#include "util/error.h"

namespace dbrx {

namespace {
constexpr auto kRateWindow = std::chrono::seconds(5);
constexpr size_t kSummaryRetry = 16;
}

Engine::Engine(Backend &backend, EngineOptions options)
    : backend_(backend),
      options_(std::move(options)),
      pool_(backend.create_kv_pool(options_.n_blocks, options_.block_size)),
      blocks_(options_.n_blocks, options_.block_size, options_.enable_prefix_cache),
      scheduler_(blocks_, options_.max_batch_tokens, options_.max_running),
      seed_source_(std::random_device{}()) {
    worker_ = std::thread([this] { run(); });
}

Engine::~Engine() {
    {
        std::lock_guard lock(mu_);
        stopping_ = true;
    }
    work_cv_.notify_all();
    worker_.join();
    std::lock_guard lock(mu_);
    for (auto &[id, r] : requests_)
        if (r->finish == DBRX_FINISH_NONE) finish(*r, DBRX_FINISH_CANCELLED);
    progress_cv_.notify_all();
}

uint64_t Engine::submit(std::span<const int32_t> prompt, const dbrx_sampling_params &sampling) {
    const int64_t n = static_cast<int64_t>(prompt.size());
    if (n == 0) invalid_argument("prompt is empty (n_prompt = 0)");
    for (size_t i = 0; i < prompt.size(); ++i) {
        if (prompt[i] < 0 || prompt[i] >= options_.n_vocab)
            invalid_argument("prompt[" + std::to_string(i) + "] = " + std::to_string(prompt[i]) +
                             " is outside the vocabulary [0, " + std::to_string(options_.n_vocab) + ")");
    }
    validate_sampling(sampling, options_.n_vocab);
    const int64_t total = n + sampling.max_tokens;
    if (total > options_.max_ctx)
        invalid_argument("n_prompt (" + std::to_string(n) + ") + max_tokens (" + std::to_string(sampling.max_tokens) +
                         ") = " + std::to_string(total) + " exceeds the context limit max_ctx = " +
                         std::to_string(options_.max_ctx));
    // The last generated token is never fed back, so a request holds at most total - 1 tokens of KV.
    const int64_t capacity = static_cast<int64_t>(options_.n_blocks) * options_.block_size;
    if (total - 1 > capacity)
        invalid_argument("n_prompt (" + std::to_string(n) + ") + max_tokens (" + std::to_string(sampling.max_tokens) +
                         ") - 1 = " + std::to_string(total - 1) + " tokens exceed the KV pool capacity of " +
                         std::to_string(capacity) + " tokens (" + std::to_string(options_.n_blocks) + " blocks of " +
                         std::to_string(options_.block_size) + ")");

    auto r = std::make_shared<Request>();
    r->tokens.assign(prompt.begin(), prompt.end());
    r->tokens.reserve(static_cast<size_t>(total));
    r->n_prompt = static_cast<int32_t>(n);
    r->sampling = sampling;
    if (sampling.n_stop_ids < 0) {
        r->stop_ids = options_.eos_ids;
    } else {
        r->stop_ids.assign(sampling.stop_ids, sampling.stop_ids + sampling.n_stop_ids);
    }
    if (options_.enable_prefix_cache) {
        const size_t bs = static_cast<size_t>(options_.block_size);
        uint64_t key = kPrefixRootKey;
        for (size_t i = 0; (i + 1) * bs <= prompt.size(); ++i) {
            key = prefix_block_key(key, prompt.subspan(i * bs, bs));
            r->prompt_block_keys.push_back(key);
        }
    }

    std::lock_guard lock(mu_);
    if (dead_) fail(DBRX_ERR_ENGINE_DEAD, "engine stopped after an internal failure: " + dead_reason_);
    if (scheduler_.n_waiting() >= static_cast<size_t>(options_.max_waiting))
        fail(DBRX_ERR_QUEUE_FULL, "the waiting queue is full (max_waiting = " + std::to_string(options_.max_waiting) +
                                      "); retry later");
    r->id = next_id_++;
    r->arrival = r->id;
    r->seed = sampling.has_seed ? sampling.seed : seed_source_();
    requests_.emplace(r->id, r);
    scheduler_.enqueue(r);
    wake_ = true;
    work_cv_.notify_one();
    return r->id;
}

std::shared_ptr<Request> Engine::find(uint64_t id) {
    auto it = requests_.find(id);
    if (it == requests_.end()) fail(DBRX_ERR_NOT_FOUND, "unknown request id " + std::to_string(id));
    return it->second;
}

PollResult Engine::poll(uint64_t id, int32_t timeout_ms, dbrx_token *out, int32_t cap) {
    if (cap < 1) invalid_argument("poll: cap must be >= 1, got " + std::to_string(cap));
    std::unique_lock lock(mu_);
    std::shared_ptr<Request> r = find(id);
    auto ready = [&] { return r->n_polled < r->output.size() || r->finish != DBRX_FINISH_NONE || r->released; };
    if (!ready()) {
        if (timeout_ms < 0) {
            progress_cv_.wait(lock, ready);
        } else if (timeout_ms > 0) {
            progress_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), ready);
        }
    }
    if (r->released) fail(DBRX_ERR_NOT_FOUND, "request " + std::to_string(id) + " was released while being polled");
    PollResult result;
    const size_t n = std::min(r->output.size() - r->n_polled, static_cast<size_t>(cap));
    std::copy_n(r->output.begin() + static_cast<std::ptrdiff_t>(r->n_polled), n, out);
    r->n_polled += n;
    result.n_tokens = static_cast<int32_t>(n);
    if (r->n_polled == r->output.size()) {
        result.finish = r->finish;
        if (r->finish == DBRX_FINISH_ERROR) result.error = r->error;
    }
    result.timed_out = n == 0 && result.finish == DBRX_FINISH_NONE;
    return result;
}

void Engine::prompt_logits(uint64_t id, std::span<float> out) {
    std::lock_guard lock(mu_);
    std::shared_ptr<Request> r = find(id);
    if (!r->sampling.keep_prompt_logits)
        invalid_argument("request " + std::to_string(id) + " was submitted without sampling.keep_prompt_logits");
    if (out.size() != static_cast<size_t>(options_.n_vocab))
        invalid_argument("prompt logits: n_vocab = " + std::to_string(out.size()) + " but the model has " +
                         std::to_string(options_.n_vocab));
    if (r->prompt_logits.empty())
        invalid_argument("request " + std::to_string(id) + (r->finish == DBRX_FINISH_NONE
                                                                ? " has not produced its first token yet"
                                                                : " finished before producing a token"));
    std::copy(r->prompt_logits.begin(), r->prompt_logits.end(), out.begin());
}

void Engine::cancel(uint64_t id) {
    std::lock_guard lock(mu_);
    std::shared_ptr<Request> r = find(id);
    if (r->finish != DBRX_FINISH_NONE) return;
    r->cancel_requested = true;
    wake_ = true;
    work_cv_.notify_one();
}

void Engine::release(uint64_t id) {
    std::lock_guard lock(mu_);
    std::shared_ptr<Request> r = find(id);
    requests_.erase(id);
    r->released = true;
    if (r->finish == DBRX_FINISH_NONE) {
        r->cancel_requested = true;
        wake_ = true;
        work_cv_.notify_one();
    }
    progress_cv_.notify_all();
}

dbrx_engine_stats Engine::stats() {
    std::lock_guard lock(mu_);
    dbrx_engine_stats s{};
    s.running = static_cast<int32_t>(scheduler_.n_running());
    s.waiting = static_cast<int32_t>(scheduler_.n_waiting());
    s.blocks_total = blocks_.n_blocks();
    s.blocks_used = blocks_.n_used();
    s.blocks_free = blocks_.n_free();
    s.blocks_cached = blocks_.n_cached();
    s.block_size = blocks_.block_size();
    s.kv_capacity_tokens = static_cast<int64_t>(s.blocks_total) * s.block_size;
    const SchedulerCounters &c = scheduler_.counters();
    s.prefix_query_tokens = c.prefix_query_tokens;
    s.prefix_hit_tokens = c.prefix_hit_tokens;
    s.preemptions = c.preemptions;
    s.prompt_tokens = c.prompt_tokens;
    s.steps = steps_;
    s.generated_tokens = generated_tokens_;
    s.finished_requests = finished_requests_;
    const auto now = std::chrono::steady_clock::now();
    while (!recent_.empty() && now - recent_.front().first > kRateWindow) recent_.pop_front();
    int64_t recent_tokens = 0;
    for (const auto &[t, n] : recent_) recent_tokens += n;
    const double window = std::chrono::duration<double>(std::min<std::chrono::steady_clock::duration>(
                                                             now - started_, kRateWindow))
                              .count();
    s.tokens_per_second = window > 0 ? static_cast<double>(recent_tokens) / window : 0.0;
    return s;
}

bool Engine::dead() {
    std::lock_guard lock(mu_);
    return dead_;
}

void Engine::run() {
    std::unique_lock lock(mu_);
    while (!stopping_) {
        bool worked = false;
        try {
            worked = step(lock);
        } catch (const std::exception &e) {
            if (!lock.owns_lock()) lock.lock();
            die(e.what());
            return;
        } catch (...) {
            if (!lock.owns_lock()) lock.lock();
            die("unknown exception in the engine worker");
            return;
        }
        if (!worked) {
            work_cv_.wait(lock, [&] { return stopping_ || wake_; });
            wake_ = false;
        }
    }
}

bool Engine::step(std::unique_lock<std::mutex> &lock) {
    for (auto &r : scheduler_.take_cancelled()) finish(*r, DBRX_FINISH_CANCELLED);
    std::vector<ScheduledSeq> batch = scheduler_.schedule();
    if (batch.empty()) {
        progress_cv_.notify_all();  // cancellations above
        return false;
    }
    std::vector<SeqStep> steps;
    steps.reserve(batch.size());
    size_t rows = 0;
    for (const auto &s : batch) {
        const Request &r = *s.request;
        SeqStep st;
        st.tokens = std::span<const int32_t>(r.tokens).subspan(static_cast<size_t>(s.pos0), static_cast<size_t>(s.n_new));
        st.pos0 = s.pos0;
        st.blocks = r.blocks;
        st.want_logits = s.want_logits();
        rows += st.want_logits ? 1 : 0;
        steps.push_back(st);
    }
    // The batch's requests, token vectors and block tables are only changed by this thread, so
    // the backend may read them without the lock while callers poll, submit and cancel.
    std::string failure;
    bool fatal = false;
    lock.unlock();
    try {
        forward_and_sample(batch, steps, rows);
    } catch (const Error &e) {
        failure = e.what();
        fatal = e.status() == DBRX_ERR_ENGINE_DEAD;
    } catch (const std::exception &e) {
        failure = e.what();
    } catch (...) {
        failure = "unknown exception";
    }
    lock.lock();
    ++steps_;
    if (fatal) {
        // The backend says its device state is lost (e.g. a sticky CUDA error): stop serving.
        die("backend " + backend_.name() + ": " + failure);
        stopping_ = true;
        return true;
    }
    if (!failure.empty()) {
        for (const auto &s : batch) {
            scheduler_.remove(*s.request);
            finish(*s.request, DBRX_FINISH_ERROR, "forward step failed on backend " + backend_.name() + ": " + failure);
        }
        progress_cv_.notify_all();
        return true;
    }
    scheduler_.commit(batch);
    const int64_t before = generated_tokens_;
    size_t row = 0;
    for (const auto &s : batch) {
        if (s.want_logits()) emit(*s.request, sampled_[row++]);
    }
    recent_.emplace_back(std::chrono::steady_clock::now(), static_cast<int32_t>(generated_tokens_ - before));
    if (recent_.size() > 100000) recent_.pop_front();
    progress_cv_.notify_all();
    return true;
}

void Engine::forward_and_sample(const std::vector<ScheduledSeq> &batch, std::span<const SeqStep> steps, size_t rows) {
    const size_t n_vocab = static_cast<size_t>(options_.n_vocab);
    needs_.clear();
    size_t full_rows = 0;  // rows that will need their full logits whatever the summary says
    for (const auto &s : batch) {
        if (!s.want_logits()) continue;
        const Request &r = *s.request;
        needs_.push_back(logits_need(r.sampling));
        // A request whose last summary could not prove its token likely fails again; retried every
        // kSummaryRetry tokens since its distribution may have narrowed.
        const bool expect_miss = r.summary_missed && r.generated().size() % kSummaryRetry != 0;
        full_rows += needs_.back().top_n == 0 || (r.sampling.keep_prompt_logits && r.output.empty()) || expect_miss;
    }
    summaries_.resize(rows);
    // Each row fetched after a summarised step is a copy of its own; past half the batch, one copy
    // of every row (forward()) costs less.
    const bool summarized =
        rows > 0 && 2 * full_rows <= rows && backend_.forward_summarized(*pool_, steps, needs_, summaries_);
    if (!summarized) {
        logits_.resize(rows * n_vocab);
        backend_.forward(*pool_, steps, logits_.data());
    }
    sampled_.resize(rows);
    size_t row = 0;
    for (const auto &s : batch) {
        if (!s.want_logits()) continue;
        Request &r = *s.request;
        Sampled &out = sampled_[row];
        out.error.clear();
        out.prompt_logits.clear();
        const bool keep_row = r.sampling.keep_prompt_logits && r.output.empty();
        std::span<const float> logits;
        if (summarized) {
            if (!keep_row) {
                const std::optional<dbrx_token> token =
                    sampler_.sample_summary(summaries_[row], options_.n_vocab, r.sampling, r.seed, r.generated().size());
                r.summary_missed = !token;
                if (token) {
                    out.token = *token;
                    ++row;
                    continue;
                }
            }
            row_.resize(n_vocab);
            backend_.fetch_logits_row(static_cast<int32_t>(row), row_.data());
            logits = row_;
        } else {
            logits = std::span<const float>(logits_).subspan(row * n_vocab, n_vocab);
        }
        try {
            out.token = sampler_.sample(logits, r.sampling, r.seed, r.prompt(), r.generated());
            if (keep_row) out.prompt_logits.assign(logits.begin(), logits.end());
        } catch (const std::exception &e) {
            out.error = std::string("sampling failed: ") + e.what();
        }
        ++row;
    }
}

void Engine::emit(Request &r, Sampled &sampled) {
    if (r.cancel_requested) return;  // finished as cancelled at the next step
    if (!sampled.error.empty()) {
        scheduler_.remove(r);
        finish(r, DBRX_FINISH_ERROR, sampled.error);
        return;
    }
    const dbrx_token token = sampled.token;
    if (r.sampling.keep_prompt_logits && r.output.empty()) r.prompt_logits = std::move(sampled.prompt_logits);
    r.tokens.push_back(token.id);
    r.output.push_back(token);
    ++generated_tokens_;
    dbrx_finish_reason reason = DBRX_FINISH_NONE;
    if (std::find(r.stop_ids.begin(), r.stop_ids.end(), token.id) != r.stop_ids.end()) {
        reason = DBRX_FINISH_STOP;
    } else if (r.output.size() >= static_cast<size_t>(r.sampling.max_tokens) ||
               r.tokens.size() >= static_cast<size_t>(options_.max_ctx)) {
        reason = DBRX_FINISH_LENGTH;
    }
    if (reason != DBRX_FINISH_NONE) {
        scheduler_.remove(r);
        finish(r, reason);
    }
}

void Engine::finish(Request &r, dbrx_finish_reason reason, std::string error) {
    if (r.finish != DBRX_FINISH_NONE) return;
    r.finish = reason;
    r.error = std::move(error);
    ++finished_requests_;
}

void Engine::die(const std::string &message) {
    dead_ = true;
    dead_reason_ = message;
    for (auto &[id, r] : requests_)
        if (r->finish == DBRX_FINISH_NONE) finish(*r, DBRX_FINISH_ERROR, "engine stopped after an internal failure: " + message);
    progress_cv_.notify_all();
}

}  // namespace dbrx
