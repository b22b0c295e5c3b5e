// `dbrx bench --synthetic dbrx --layers N [--quick] [--json FILE]`: the CUDA backend at full DBRX
// width on weights generated on the GPU. Every figure is printed with the hardware floor of the
// same work (bytes / measured read bandwidth, or FLOPs / measured bf16 GEMM rate) and the fraction.
#ifdef DBRX_WITH_CUDA

#include "bench_cuda.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "bench.h"
#include "cli.h"

namespace dbrx::cli {
namespace bench {

double time_ms(cudaStream_t stream, int warmup, int iters, const std::function<void()> &fn) {
    for (int i = 0; i < warmup; ++i) fn();
    cudaEvent_t a, b;
    DBRX_CUDA_CHECK(cudaEventCreate(&a));
    DBRX_CUDA_CHECK(cudaEventCreate(&b));
    DBRX_CUDA_CHECK(cudaEventRecord(a, stream));
    for (int i = 0; i < iters; ++i) fn();
    DBRX_CUDA_CHECK(cudaEventRecord(b, stream));
    DBRX_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    DBRX_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms / iters;
}

void write_json(const std::string &path, const nlohmann::json &doc) {
    std::ofstream f(path);
    if (!f) throw ApiError(DBRX_ERR_IO, "cannot write " + path);
    f << doc.dump(2) << "\n";
}

double expected_active_share(int32_t n_experts, int32_t top_k, double batch) {
    return 1 - std::pow(1.0 - double(top_k) / n_experts, batch);
}

DecodeSequences decode_sequences(int32_t B, int32_t per_seq, int32_t ctx, std::mt19937 &rng,
                                 std::uniform_int_distribution<int32_t> &tok) {
    DecodeSequences s;
    s.tables.resize(B);
    s.prompts.resize(B);
    for (int32_t b = 0; b < B; ++b) {
        s.tables[b].resize(per_seq);
        std::iota(s.tables[b].begin(), s.tables[b].end(), b * per_seq);
        s.prompts[b].resize(ctx);
        for (auto &t : s.prompts[b]) t = tok(rng);
    }
    return s;
}

Ceilings measure_ceilings(cudaStream_t stream) {
    using namespace dbrx::cuda;
    Ceilings c;
    {
        const int64_t n = int64_t{1} << 31;  // 4 GiB of bf16
        DeviceBuffer buf(n * sizeof(bf16_t), "bandwidth probe");
        DeviceBuffer out(sizeof(float) * 132 * 64, "bandwidth probe");
        fill_uniform(buf.as<bf16_t>(), n, 7, 0.f, 1.f, stream);
        const double ms = time_ms(stream, 2, 10, [&] { read_probe(buf.as<bf16_t>(), n, out.as<float>(), stream); });
        c.read_bytes_per_s = n * 2.0 / (ms * 1e-3);
    }
    {
        const int64_t m = 8192;
        DeviceBuffer x(m * m * sizeof(bf16_t)), w(m * m * sizeof(bf16_t)), y(m * m * sizeof(float));
        fill_uniform(x.as<bf16_t>(), m * m, 8, 0.f, 1.f, stream);
        fill_uniform(w.as<bf16_t>(), m * m, 9, 0.f, 1.f, stream);
        CublasHandle blas(stream);
        const double ms = time_ms(stream, 3, 10, [&] {
            gemm_xwt(blas.get(), x.as<bf16_t>(), m, m, w.as<bf16_t>(), m, y.as<float>());
        });
        c.gemm_flops_per_s = 2.0 * m * m * m / (ms * 1e-3);
    }
    return c;
}

double floor_ms(double bytes, double flops, const Ceilings &c) {
    const double a = bytes / c.read_bytes_per_s, b = flops / c.gemm_flops_per_s;
    return 1e3 * (a > b ? a : b);
}

std::string bytes_flops_basis(double bytes, double flops, const Ceilings &c) {
    char buf[96];
    if (bytes / c.read_bytes_per_s >= flops / c.gemm_flops_per_s)
        std::snprintf(buf, sizeof buf, "bytes %.3g GB", bytes / 1e9);
    else
        std::snprintf(buf, sizeof buf, "FLOPs %.3g T", flops / 1e12);
    return buf;
}

}  // namespace bench

int run_bench(int argc, char **argv) {
    Args args(argc, argv, 2, {"quick"});
    const std::string model = args.required("synthetic");
    if (model != "dbrx") throw UsageError("--synthetic takes 'dbrx' (the full-width DBRX shape), got '" + model + "'");
    const int32_t layers = static_cast<int32_t>(args.integer("layers", 2, 1, 40));
    const bool quick = args.str("quick") == "true";
    const std::string json_path = args.str("json");
    const int64_t device = args.integer("device-id", 0, 0, 64);
    // --only moe,attention,e2e: a subset of the figures (all by default), for quick kernel work.
    const std::string only = "," + args.str("only", "moe,attention,e2e") + ",";
    auto wants = [&](const char *part) { return only.find("," + std::string(part) + ",") != std::string::npos; };
    if (!wants("moe") && !wants("attention") && !wants("e2e"))
        throw UsageError("--only takes a comma list of moe, attention, e2e; got '" + args.str("only") + "'");
    args.reject_unknown();
    try {
        cuda::set_device(static_cast<int>(device));
        cudaDeviceProp prop{};
        DBRX_CUDA_CHECK(cudaGetDeviceProperties(&prop, static_cast<int>(device)));
        cuda::Stream stream;
        const bench::Ceilings c = bench::measure_ceilings(stream.get());
        std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
        std::printf("measured ceilings: HBM read %.2f TB/s, bf16 GEMM (8192^3, cuBLAS) %.0f TFLOP/s\n\n",
                    c.read_bytes_per_s / 1e12, c.gemm_flops_per_s / 1e12);
        std::vector<bench::Row> rows;
        if (wants("moe")) bench::bench_moe(stream.get(), c, quick, rows);
        if (wants("attention")) bench::bench_attention_all(stream.get(), c, quick, rows);
        if (wants("e2e")) bench::bench_end_to_end(layers, c, quick, rows);
        std::printf("\n%-44s %11s %11s %9s  %-18s %s\n", "figure", "ours ms", "floor ms", "fraction", "floor basis",
                    "achieved");
        nlohmann::json out = {{"device", prop.name},
                              {"layers", layers},
                              {"read_tb_s", c.read_bytes_per_s / 1e12},
                              {"gemm_tflop_s", c.gemm_flops_per_s / 1e12},
                              {"rows", nlohmann::json::array()}};
        for (const auto &r : rows) {
            std::printf("%-44s %11.4f %11.4f %9.3f  %-18s %s\n", r.name.c_str(), r.ours_ms, r.floor_ms,
                        r.floor_ms / r.ours_ms, r.basis.c_str(), r.extra.c_str());
            out["rows"].push_back({{"name", r.name},
                                   {"ours_ms", r.ours_ms},
                                   {"floor_ms", r.floor_ms},
                                   {"basis", r.basis},
                                   {"extra", r.extra}});
        }
        if (!json_path.empty()) bench::write_json(json_path, out);
    } catch (const Error &e) {
        throw ApiError(e.status(), e.what());
    }
    return 0;
}

}  // namespace dbrx::cli

#endif
