// `dbrx bench --synthetic dbrx --layers N --tp N [--ep N] [--devices 0,1,..] [--transport nccl|host]
//  [--batch 1,16] [--ctx N] [--quick] [--json FILE]`: the sharded CUDA backend on a synthetic
// full-width DBRX split over tp x ep GPUs. Per rank: device memory (weights, KV, the rest); per
// batch size: decode step time with CUDA graphs (NCCL ranks capture their decode steps, collectives
// included) and without, collective time per layer (CUDA events around every all-reduce and the
// logits all-gather, in steps run without graphs: a graph replays no host-recorded events) and the
// fraction of the floor (the slowest rank's bytes / HBM bandwidth over the step time with graphs).
// --transport host runs the ranks through host memory, so that several may share one GPU (a
// smoke test of the sharded math and of this benchmark on a single GPU; its collectives are slow).
#include <cstdio>
#include <string>
#include <vector>

#include "cli.h"

#ifdef DBRX_WITH_CUDA

#include <algorithm>
#include <chrono>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_model.h"
#include "bench_cuda.h"
#include "dist/shard_plan.h"
#include "dist/sharded_cuda_backend.h"

namespace dbrx::cli {
namespace {

constexpr int32_t kBlock = 16;

std::vector<int32_t> int_list(const Args &args, const std::string &name, const std::string &fallback) {
    const std::string text = args.str(name, fallback);
    try {
        return parse_ids(text, "--" + name);
    } catch (const UsageError &) {
        throw UsageError("--" + name + " must be a comma-separated list of integers, got '" + text + "'");
    }
}

// Bytes one rank reads in a decode step of B sequences at context ctx: its attention weights, the
// replicated router and norms, its experts' FFN slices that the batch routes to (expected distinct
// experts under uniform routing), its lm_head slice and its KV heads' cache.
double rank_decode_bytes(const ModelConfig &g, const dist::RankShard &s, double B, double ctx) {
    const double d = g.d_model, hd = g.head_dim, nq = s.q_heads.size(), nkv = s.kv_heads.size();
    const double attn = ((nq + 2 * nkv) * hd * d + d * nq * hd + g.n_experts * d + 2 * d) * 2;
    const double held = s.experts.size();
    const double active = held * bench::expected_active_share(g.n_experts, g.top_k, B);
    const double experts = active * 3 * s.ffn.size() * d * 2;
    const double kv = B * ctx * nkv * hd * 2 * 2;
    return g.n_layers * (attn + experts + kv) + double(s.vocab.size()) * d * 2;
}

double gib(int64_t b) { return static_cast<double>(b) / (1 << 30); }

}  // namespace

int run_bench_dist(int argc, char **argv) {
    Args args(argc, argv, 2, {"quick"});
    const std::string model = args.required("synthetic");
    if (model != "dbrx") throw UsageError("--synthetic takes 'dbrx' (the full-width DBRX shape), got '" + model + "'");
    const int32_t layers = static_cast<int32_t>(args.integer("layers", 2, 1, 40));
    const int32_t tp = static_cast<int32_t>(args.integer("tp", 1, 1, 64));
    const int32_t ep = static_cast<int32_t>(args.integer("ep", 1, 1, 16));
    const bool quick = args.str("quick") == "true";
    const int32_t ctx = static_cast<int32_t>(args.integer("ctx", 1024, 1, 32000));
    const std::string transport = args.str("transport", "nccl");
    if (transport != "nccl" && transport != "host") throw UsageError("--transport takes nccl or host, got '" + transport + "'");
    const std::string json_path = args.str("json");
    const int32_t world = tp * ep;
    std::string default_devices;
    for (int32_t i = 0; i < world; ++i) default_devices += (i ? "," : "") + std::to_string(i);
    const std::vector<int32_t> devices = int_list(args, "devices", default_devices);
    const std::vector<int32_t> batches = int_list(args, "batch", quick ? "1" : "1,16");
    args.reject_unknown();
    for (int32_t b : batches)
        if (b < 1 || b > 256) throw UsageError("--batch sizes must be in [1, 256]");
    if (static_cast<int32_t>(devices.size()) != world)
        throw UsageError("tp * ep = " + std::to_string(world) + " ranks but --devices lists " +
                         std::to_string(devices.size()) + " GPUs (one rank per GPU)");
    int visible = 0;
    if (cudaGetDeviceCount(&visible) != cudaSuccess) visible = 0;
    const std::set<int32_t> distinct(devices.begin(), devices.end());
    for (int32_t d : devices)
        if (d < 0 || d >= visible) {
            std::string list;
            for (int32_t x : devices) list += (list.empty() ? "" : ",") + std::to_string(x);
            throw ApiError(DBRX_ERR_UNSUPPORTED,
                           "tp " + std::to_string(tp) + " x ep " + std::to_string(ep) + " needs " + std::to_string(world) +
                               " GPUs (devices " + list + ") but " + std::to_string(visible) +
                               " CUDA device(s) are visible; --transport host --devices 0,0,... runs the ranks on one "
                               "GPU through host memory");
        }
    if (transport == "nccl" && static_cast<int32_t>(distinct.size()) != world)
        throw UsageError("--devices repeats a GPU; NCCL runs one rank per GPU (--transport host shares one)");

    try {
        const ModelConfig cfg = cuda::dbrx_config(layers);
        const dist::ShardPlan plan = dist::ShardPlan::make(cfg, tp, ep);
        cuda::set_device(devices[0]);
        bench::Ceilings ceil;
        {
            cuda::Stream stream;
            ceil = bench::measure_ceilings(stream.get());
        }
        std::printf("sharded CUDA bench: %s, %d layers, %s transport, devices", plan.describe().c_str(), layers,
                    transport.c_str());
        for (int32_t d : devices) std::printf(" %d", d);
        std::printf("\nHBM read %.2f TB/s (GPU %d)\n", ceil.read_bytes_per_s / 1e12, devices[0]);
        std::fflush(stdout);

        dist::ShardedCudaOptions opt;
        opt.devices = devices;
        opt.transport = transport == "host" ? dist::CudaTransport::Host : dist::CudaTransport::Nccl;
        opt.rendezvous.rank = 0;  // one process
        opt.rendezvous.world_size = 1;
        auto be = dist::make_synthetic_sharded_cuda_backend(cfg, tp, ep, opt, 42);
        const int32_t steps = quick ? 5 : 20, warmup = 2;
        int32_t max_b = 1;
        for (int32_t b : batches) max_b = std::max(max_b, b);
        const int32_t per_seq = (ctx + 2 * warmup + 3 * steps + kBlock - 1) / kBlock + 1;
        auto pool = be->create_kv_pool(per_seq * max_b, kBlock);
        std::mt19937 rng(5);
        std::uniform_int_distribution<int32_t> tok(0, cfg.vocab_size - 1);
        std::vector<float> logits(static_cast<size_t>(max_b) * cfg.vocab_size);

        nlohmann::json out = {{"tp", tp}, {"ep", ep}, {"layers", layers}, {"transport", transport},
                              {"read_tb_s", ceil.read_bytes_per_s / 1e12}, {"ranks", nlohmann::json::array()},
                              {"decode", nlohmann::json::array()}};
        std::printf("\n%-22s %10s %13s %12s %14s %10s %9s\n", "decode", "step ms", "no-graph ms", "coll ms/lyr",
                    "coll share", "floor ms", "fraction");
        for (int32_t B : batches) {
            const bench::DecodeSequences seqs = bench::decode_sequences(B, per_seq, ctx, rng, tok);
            const auto &tables = seqs.tables, &prompts = seqs.prompts;
            for (int32_t b = 0; b < B; ++b) {  // one prefill per sequence bounds the activations
                SeqStep pre{prompts[b], 0, tables[b], false};
                be->forward(*pool, std::span<const SeqStep>(&pre, 1), logits.data());
            }
            std::vector<int32_t> next(B);
            int32_t pos = ctx;
            auto step = [&] {
                std::vector<SeqStep> dec(B);
                for (int32_t b = 0; b < B; ++b) {
                    next[b] = tok(rng);
                    dec[b] = SeqStep{std::span<const int32_t>(&next[b], 1), pos, tables[b], true};
                }
                be->forward(*pool, dec, logits.data());
                ++pos;
            };
            auto timed_steps = [&] {
                const auto t0 = std::chrono::steady_clock::now();
                for (int32_t i = 0; i < steps; ++i) step();  // forward waits for every rank's stream
                return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / steps;
            };
            for (int32_t i = 0; i < warmup; ++i) step();  // the second one captures the graphs
            const double ms = timed_steps();
            be->set_cuda_graphs(false);
            step();
            const double ms_eager = timed_steps();
            be->set_cuda_graphs(true);
            be->set_collective_timing(true);  // eager steps: graphs replay no host-recorded events
            be->rank_stats();  // drop earlier timings
            timed_steps();
            double coll = 0;
            for (const dist::CudaRankStats &s : be->rank_stats()) coll = std::max(coll, s.collective_ms / steps);
            be->set_collective_timing(false);
            // Per layer: the two all-reduces; the step's one logits all-gather is spread over the layers.
            const double coll_layer = coll / layers;
            double floor_bytes = 0;
            for (int32_t r = 0; r < world; ++r)
                floor_bytes = std::max(floor_bytes, rank_decode_bytes(cfg, plan.shard(r), B, ctx + warmup + steps / 2.0));
            const double floor = 1e3 * floor_bytes / ceil.read_bytes_per_s;
            char name[48];
            std::snprintf(name, sizeof name, "B=%d ctx=%d", B, ctx);
            std::printf("%-22s %10.3f %13.3f %12.4f %13.1f%% %10.3f %9.3f\n", name, ms, ms_eager, coll_layer,
                        100 * coll / ms_eager, floor, floor / ms);
            out["decode"].push_back({{"batch", B}, {"ctx", ctx}, {"step_ms", ms}, {"step_ms_no_graphs", ms_eager},
                                     {"collective_ms_per_layer", coll_layer}, {"floor_ms", floor},
                                     {"fraction", floor / ms}});
        }
        // After the runs, so that "other" holds the activations of the largest step too.
        std::printf("\n%-10s %6s %12s %10s %26s %14s\n", "rank", "GPU", "weights GiB", "KV GiB",
                    "other GiB (activations, ...)", "graph replays");
        for (const dist::CudaRankStats &s : be->rank_stats()) {
            std::printf("%-10d %6d %12.2f %10.2f %26.2f %14lld\n", s.rank, s.device, gib(s.weight_bytes),
                        gib(s.kv_bytes), gib(s.workspace_bytes), static_cast<long long>(s.graph_replays));
            out["ranks"].push_back({{"rank", s.rank}, {"device", s.device}, {"weight_bytes", s.weight_bytes},
                                    {"kv_bytes", s.kv_bytes}, {"other_bytes", s.workspace_bytes},
                                    {"graph_replays", s.graph_replays}});
        }
        if (!json_path.empty()) bench::write_json(json_path, out);
    } catch (const Error &e) {
        throw ApiError(e.status(), e.what());
    }
    return 0;
}

}  // namespace dbrx::cli

#else

namespace dbrx::cli {

int run_bench_dist(int, char **) {
    throw ApiError(DBRX_ERR_UNSUPPORTED,
                   "bench --synthetic --tp runs the sharded CUDA backend; this build has none (-DDBRX_CUDA=ON)");
}

}  // namespace dbrx::cli

#endif
