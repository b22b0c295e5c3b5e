// dbrx bench --model DIR: end-to-end throughput of a real checkpoint through the engine:
// B requests of P random prompt tokens each, G greedy tokens each (eos ignored).
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "cli.h"

namespace dbrx::cli {

int cmd_throughput(int argc, char **argv) {
    Args args(argc, argv, 2, {"batch-invariant"});
    const int32_t prompt_len = static_cast<int32_t>(args.integer("prompt-len", 64, 1, 1 << 20));
    const int32_t gen = static_cast<int32_t>(args.integer("gen", 64, 1, 1 << 20));
    const int32_t batch = static_cast<int32_t>(args.integer("batch", 1, 1, 4096));
    LoadedModel m;
    load_model(args, dbrx_engine_default_params(), m);
    args.reject_unknown();

    std::mt19937 rng(1234);
    std::uniform_int_distribution<int32_t> token(0, m.info.n_vocab - 1);
    dbrx_sampling_params sp = dbrx_sampling_default_params();
    sp.max_tokens = gen;
    sp.n_stop_ids = 0;

    using clock = std::chrono::steady_clock;
    auto t0 = clock::now();
    std::vector<uint64_t> ids(batch);
    for (int32_t b = 0; b < batch; ++b) {
        std::vector<int32_t> prompt(prompt_len);
        for (auto &t : prompt) t = token(rng);
        check(dbrx_engine_submit(m.engine, prompt.data(), prompt_len, &sp, &ids[b]), "submitting");
    }
    std::vector<int32_t> produced(batch, 0);
    std::vector<bool> done(batch, false);
    double first_token_s = 0;
    int32_t n_done = 0, n_started = 0;
    dbrx_token tok[64];
    while (n_done < batch) {
        for (int32_t b = 0; b < batch; ++b) {
            if (done[b]) continue;
            int32_t n = 0;
            dbrx_finish_reason finish = DBRX_FINISH_NONE;
            dbrx_status s = dbrx_engine_poll(m.engine, ids[b], 5, tok, 64, &n, &finish);
            if (s != DBRX_ERR_TIMEOUT) check(s, "polling");
            if (n > 0 && produced[b] == 0 && ++n_started == batch)
                first_token_s = std::chrono::duration<double>(clock::now() - t0).count();
            produced[b] += n;
            if (finish != DBRX_FINISH_NONE) {
                if (finish != DBRX_FINISH_LENGTH) throw ApiError(DBRX_ERR_INTERNAL, "a request ended early");
                done[b] = true;
                ++n_done;
                dbrx_engine_release(m.engine, ids[b]);
            }
        }
    }
    double total_s = std::chrono::duration<double>(clock::now() - t0).count();
    dbrx_engine_stats st{};
    check(dbrx_engine_get_stats(m.engine, &st), "reading engine stats");
    const double decode_s = total_s - first_token_s;
    std::printf("model: %d layers, d_model %d, %d experts top-%d, vocab %d, device %s\n", m.info.n_layers,
                m.info.d_model, m.info.n_experts, m.info.top_k, m.info.n_vocab,
                m.info.device == DBRX_DEVICE_CUDA ? "cuda" : "cpu");
    std::printf("batch %d, prompt %d, generate %d: %lld engine steps, %lld preemptions\n", batch, prompt_len, gen,
                static_cast<long long>(st.steps), static_cast<long long>(st.preemptions));
    std::printf("prefill: %.3f s until every first token, %.1f prompt tokens/s\n", first_token_s,
                batch * static_cast<double>(prompt_len) / first_token_s);
    std::printf("decode:  %.3f s for the rest, %.1f tokens/s (%.2f ms per step)\n", decode_s,
                batch * static_cast<double>(gen - 1) / decode_s, 1000.0 * decode_s / (gen > 1 ? gen - 1 : 1));
    return 0;
}

}  // namespace dbrx::cli
