// End-to-end figures of `dbrx bench --synthetic dbrx`: decode steps and a prefill through the CUDA
// backend (Backend::forward, logits copied to the host) on a synthetic full-width model. Decode steps
// run as CUDA graphs (captured during the warm-up, so capture is not timed), then the device stage
// alone (CudaBackend::compute_logits: no logits copy to the host), then without graphs.
#ifdef DBRX_WITH_CUDA

#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>

#include "backend/cuda/cuda_backend.h"
#include "bench_cuda.h"

namespace dbrx::cli::bench {
namespace {

using namespace dbrx::cuda;

struct Sequences {
    std::vector<std::vector<int32_t>> blocks;
    std::vector<int32_t> len;
};

// Weight bytes a decode step must read with `experts` experts active per layer, plus the KV cache.
double decode_bytes(const ModelConfig &c, double experts, double batch, double ctx) {
    const double d = c.d_model, F = c.ffn_hidden;
    const double attn = (static_cast<double>(c.qkv_rows()) * d + d * d + c.n_experts * d + 2 * d) * 2;
    const double kv = batch * ctx * c.n_kv_heads * c.head_dim * 2 * 2;
    return c.n_layers * (attn + experts * 3 * F * d * 2 + kv) + static_cast<double>(c.vocab_size) * d * 2;
}

// FLOPs of a prefill of T tokens from position 0 (logits of the last token only).
double prefill_flops(const ModelConfig &c, double T) {
    const double d = c.d_model, F = c.ffn_hidden;
    const double per_token = 2 * (static_cast<double>(c.qkv_rows()) * d + d * d + c.n_experts * d +
                                  c.top_k * 3 * F * d);
    const double attn = 4.0 * c.head_dim * c.n_heads * T * (T + 1) / 2;
    return c.n_layers * (per_token * T + attn) + 2.0 * c.vocab_size * d;
}

}  // namespace

void bench_end_to_end(int32_t layers, const Ceilings &c, bool quick, std::vector<Row> &rows) {
    std::printf("generating a synthetic DBRX model with %d layers on the GPU...\n", layers);
    std::fflush(stdout);
    auto be = make_cuda_backend_from(synthetic_model(dbrx_config(layers), 42), 0);
    const ModelConfig &cfg = be->model().config;
    std::printf("weights: %.2f GiB of device memory\n", be->model().bytes / double(1 << 30));
    const int32_t bs = 16, ctx0 = 1024, steps = quick ? 5 : 20, max_batch = 64, warmup = 3;
    // Room for the warm-up and timed steps of the three decode rows of each batch size.
    const int32_t per_seq = (ctx0 + 3 * (warmup + steps) + bs - 1) / bs + 1;
    auto pool = be->create_kv_pool(per_seq * max_batch, bs);
    auto &cuda_pool = dynamic_cast<CudaKvPool &>(*pool);
    std::mt19937 rng(3);
    std::uniform_int_distribution<int32_t> tok(0, cfg.vocab_size - 1);
    std::vector<float> logits(static_cast<size_t>(max_batch) * cfg.vocab_size);
    cudaStream_t s = be->stream();

    // Prefill: one sequence of 2048 tokens (chunk sizes the engine would use for a long prompt).
    {
        const int32_t T = quick ? 512 : 2048;
        std::vector<int32_t> prompt(T), blocks((T + bs - 1) / bs);
        for (auto &t : prompt) t = tok(rng);
        std::iota(blocks.begin(), blocks.end(), 0);
        SeqStep step{prompt, 0, blocks, true};
        const double ms = time_ms(s, 1, 3, [&] { be->forward(*pool, std::span<const SeqStep>(&step, 1), logits.data()); });
        const double flops = prefill_flops(cfg, T);
        char name[64], extra[64];
        std::snprintf(name, sizeof name, "prefill %d tokens, %d layers", T, layers);
        std::snprintf(extra, sizeof extra, "%.1f TFLOP/s", flops / (ms * 1e-3) / 1e12);
        rows.push_back({name, ms, floor_ms(0, flops, c), bytes_flops_basis(0, flops, c), extra});
        std::printf("%-44s %.4f ms\n", name, ms);
    }
    // Decode at several batch sizes after a 1024-token prefill of each sequence.
    for (int32_t B : {1, 8, 64}) {
        const DecodeSequences seqs = decode_sequences(B, per_seq, ctx0, rng, tok);
        const auto &tables = seqs.tables, &prompts = seqs.prompts;
        std::vector<SeqStep> pre(B);
        for (int32_t b = 0; b < B; ++b) pre[b] = SeqStep{prompts[b], 0, tables[b], false};
        for (int32_t b = 0; b < B; b += 8)  // prefill in groups of 8 to bound activation memory
            be->forward(*pool, std::span<const SeqStep>(pre.data() + b, std::min(8, B - b)), logits.data());
        std::vector<int32_t> next(B);
        int32_t pos = ctx0;
        // Graphs and NoGraphs deliver what the engine asks for a greedy request: a device-side summary
        // per row (backend.h forward_summarized), not the [vocab] logits; FullLogits copies every row.
        enum class Mode { Graphs, DeviceStage, NoGraphs, FullLogits };
        const std::vector<LogitsNeed> needs(B, LogitsNeed{1, 0.f});
        std::vector<LogitsSummary> summaries(B);
        Mode mode = Mode::Graphs;
        auto step = [&] {
            std::vector<SeqStep> dec(B);
            for (int32_t b = 0; b < B; ++b) {
                next[b] = tok(rng);
                dec[b] = SeqStep{std::span<const int32_t>(&next[b], 1), pos, tables[b], true};
            }
            if (mode == Mode::DeviceStage) {  // single-threaded here, so no lock is needed around it
                be->compute_logits(cuda_pool, dec);
                DBRX_CUDA_CHECK(cudaStreamSynchronize(s));
            } else if (mode == Mode::FullLogits) {
                be->forward(*pool, dec, logits.data());
            } else if (!be->forward_summarized(*pool, dec, needs, summaries)) {
                throw Error(DBRX_ERR_INTERNAL, "bench: the CUDA backend refused device-side summaries");
            }
            ++pos;
        };
        // Experts a batch touches per layer: all 4 at B=1, the expected distinct count above.
        const double experts = cfg.n_experts * expected_active_share(cfg.n_experts, cfg.top_k, B);
        const double bytes = decode_bytes(cfg, experts, B, ctx0 + warmup + steps / 2.0);
        double graph_ms = 0;
        for (Mode m : {Mode::Graphs, Mode::DeviceStage, Mode::NoGraphs, Mode::FullLogits}) {
            mode = m;
            be->set_cuda_graphs(m != Mode::NoGraphs);
            const GraphStats before = be->graph_stats();
            const double ms = time_ms(s, warmup, steps, step);
            const int64_t replays = be->graph_stats().replays - before.replays;
            if (m == Mode::Graphs) graph_ms = ms;
            char name[96], extra[96];
            std::snprintf(name, sizeof name, "decode step B=%d ctx=%d, %d layers%s", B, ctx0, layers,
                          m == Mode::Graphs        ? ""
                          : m == Mode::DeviceStage ? ", device stage"
                          : m == Mode::NoGraphs    ? ", no graphs"
                                                   : ", full logits to host");
            if (m == Mode::NoGraphs || m == Mode::FullLogits)
                std::snprintf(extra, sizeof extra, "%.2f TB/s, %.2fx the graph step", bytes / (ms * 1e-3) / 1e12,
                              ms / graph_ms);
            else
                std::snprintf(extra, sizeof extra, "%.2f TB/s, %.0f tok/s, %lld of %d steps graphs",
                              bytes / (ms * 1e-3) / 1e12, B / (ms * 1e-3), static_cast<long long>(replays),
                              warmup + steps);
            rows.push_back({name, ms, floor_ms(bytes, 0, c), bytes_flops_basis(bytes, 0, c), extra});
            std::printf("%-60s %.4f ms  (%s)\n", name, ms, extra);
            std::fflush(stdout);
        }
        be->set_cuda_graphs(true);
    }
}

}  // namespace dbrx::cli::bench

#endif
