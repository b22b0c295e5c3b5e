// C API: engines, requests, stats and the one-shot dbrx_generate.
#include <algorithm>
#include <string>
#include <vector>

#include "api/api_guard.h"
#include "api/handles.h"

using dbrx::api::guarded;
using dbrx::api::require;

namespace {

dbrx::Engine &live(dbrx_engine *engine) {
    require(engine, "engine");
    return *engine->engine;
}

void check_prompt(const int32_t *prompt, int32_t n_prompt) {
    if (n_prompt < 0) dbrx::invalid_argument("n_prompt must be >= 0, got " + std::to_string(n_prompt));
    if (n_prompt > 0) require(prompt, "prompt");
}

}  // namespace

extern "C" {

DBRX_API dbrx_engine_params dbrx_engine_default_params(void) {
    dbrx_engine_params p{};
    p.block_size = 16;
    p.kv_blocks = 0;
    p.kv_cache_bytes = 0;
    p.kv_cache_fraction = 0.9f;
    p.max_batch_tokens = 2048;
    p.max_running = 256;
    p.max_waiting = 4096;
    p.max_ctx = 0;
    p.enable_prefix_cache = true;
    return p;
}

DBRX_API dbrx_sampling_params dbrx_sampling_default_params(void) {
    dbrx_sampling_params p{};
    p.temperature = 0.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repetition_penalty = 1.0f;
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.0f;
    p.seed = 0;
    p.max_tokens = 256;
    p.top_logprobs = 0;
    p.n_stop_ids = -1;
    p.has_seed = false;
    p.logprobs = false;
    p.keep_prompt_logits = false;
    return p;
}

DBRX_API dbrx_status dbrx_engine_create(dbrx_model *model, const dbrx_engine_params *params, dbrx_engine **out) {
    return guarded("dbrx_engine_create", [&] {
        require(out, "out");
        *out = nullptr;
        require(model, "model");
        require(params, "params");
        if (model->is_follower)
            dbrx::invalid_argument("the model is process " + std::to_string(model->node_rank) + " of " +
                                   std::to_string(model->n_nodes) + " (node_rank > 0): only process 0 runs an "
                                   "engine; call dbrx_model_serve(model) here to run its steps");
        const dbrx::ModelConfig &c = model->config;
        dbrx::EngineOptions options =
            dbrx::resolve_engine_options(*params, *model->backend, c.vocab_size, c.max_seq_len, c.eos_ids);
        auto engine = std::make_unique<dbrx_engine>();
        engine->model = model;
        engine->engine = std::make_unique<dbrx::Engine>(*model->backend, std::move(options));
        *out = engine.release();
    });
}

DBRX_API void dbrx_engine_free(dbrx_engine *engine) {
    // The destructor joins the worker; it does not throw.
    delete engine;
}

DBRX_API dbrx_status dbrx_engine_submit(dbrx_engine *engine, const int32_t *prompt, int32_t n_prompt,
                                        const dbrx_sampling_params *sampling, uint64_t *out_id) {
    return guarded("dbrx_engine_submit", [&] {
        dbrx::Engine &e = live(engine);
        check_prompt(prompt, n_prompt);
        require(sampling, "sampling");
        require(out_id, "out_id");
        *out_id = e.submit(std::span<const int32_t>(prompt, static_cast<size_t>(n_prompt)), *sampling);
    });
}

DBRX_API dbrx_status dbrx_engine_poll(dbrx_engine *engine, uint64_t id, int32_t timeout_ms, dbrx_token *out,
                                      int32_t cap, int32_t *n_out, dbrx_finish_reason *finish) {
    dbrx_status timed_out = DBRX_OK;
    dbrx_status status = guarded("dbrx_engine_poll", [&] {
        dbrx::Engine &e = live(engine);
        require(out, "out");
        require(n_out, "n_out");
        require(finish, "finish");
        *n_out = 0;
        *finish = DBRX_FINISH_NONE;
        dbrx::PollResult r = e.poll(id, timeout_ms, out, cap);
        *n_out = r.n_tokens;
        *finish = r.finish;
        if (r.finish == DBRX_FINISH_ERROR) dbrx::api::set_last_error("request " + std::to_string(id) + ": " + r.error);
        if (r.timed_out) {
            dbrx::api::set_last_error("dbrx_engine_poll: nothing new for request " + std::to_string(id) + " within " +
                                      std::to_string(timeout_ms) + " ms");
            timed_out = DBRX_ERR_TIMEOUT;
        }
    });
    return status != DBRX_OK ? status : timed_out;
}

DBRX_API dbrx_status dbrx_engine_get_prompt_logits(dbrx_engine *engine, uint64_t id, float *out, int32_t n_vocab) {
    return guarded("dbrx_engine_get_prompt_logits", [&] {
        dbrx::Engine &e = live(engine);
        require(out, "out");
        if (n_vocab < 0) dbrx::invalid_argument("n_vocab must be >= 0, got " + std::to_string(n_vocab));
        e.prompt_logits(id, std::span<float>(out, static_cast<size_t>(n_vocab)));
    });
}

DBRX_API dbrx_status dbrx_engine_cancel(dbrx_engine *engine, uint64_t id) {
    return guarded("dbrx_engine_cancel", [&] { live(engine).cancel(id); });
}

DBRX_API dbrx_status dbrx_engine_release(dbrx_engine *engine, uint64_t id) {
    return guarded("dbrx_engine_release", [&] { live(engine).release(id); });
}

DBRX_API dbrx_status dbrx_engine_get_stats(dbrx_engine *engine, dbrx_engine_stats *out) {
    return guarded("dbrx_engine_get_stats", [&] {
        dbrx::Engine &e = live(engine);
        require(out, "out");
        *out = e.stats();
    });
}

DBRX_API dbrx_status dbrx_generate(dbrx_engine *engine, const int32_t *prompt, int32_t n_prompt,
                                   const dbrx_sampling_params *sampling, int32_t *out_ids, int32_t cap,
                                   int32_t *n_out, float *last_logits, dbrx_finish_reason *finish) {
    return guarded("dbrx_generate", [&] {
        dbrx::Engine &e = live(engine);
        check_prompt(prompt, n_prompt);
        require(sampling, "sampling");
        require(out_ids, "out_ids");
        require(n_out, "n_out");
        require(finish, "finish");
        if (cap < 1) dbrx::invalid_argument("cap must be >= 1, got " + std::to_string(cap));
        *n_out = 0;
        *finish = DBRX_FINISH_NONE;
        // No more tokens than out_ids holds are generated.
        dbrx_sampling_params s = *sampling;
        s.max_tokens = std::min(s.max_tokens, cap);
        if (last_logits != nullptr) s.keep_prompt_logits = true;
        const uint64_t id = e.submit(std::span<const int32_t>(prompt, static_cast<size_t>(n_prompt)), s);
        struct Releaser {
            dbrx::Engine &e;
            uint64_t id;
            ~Releaser() {
                try {
                    e.release(id);
                } catch (...) {  // already gone: nothing to undo
                }
            }
        } releaser{e, id};
        std::vector<dbrx_token> tokens(64);
        int32_t n = 0;
        for (;;) {
            dbrx::PollResult r = e.poll(id, -1, tokens.data(), static_cast<int32_t>(tokens.size()));
            for (int32_t i = 0; i < r.n_tokens && n < cap; ++i) out_ids[n++] = tokens[static_cast<size_t>(i)].id;
            *n_out = n;
            if (r.finish == DBRX_FINISH_NONE) continue;
            *finish = r.finish;
            if (r.finish == DBRX_FINISH_ERROR)
                dbrx::fail(e.dead() ? DBRX_ERR_ENGINE_DEAD : DBRX_ERR_INTERNAL, "request failed: " + r.error);
            break;
        }
        if (last_logits != nullptr) {
            e.prompt_logits(id, std::span<float>(last_logits, static_cast<size_t>(e.options().n_vocab)));
        }
    });
}

}  // extern "C"
