// Pieces of `dbrx bench --synthetic` (bench_cuda*.cpp): timing, the hardware ceilings measured
// in the same run, and the rows of the result table.
#pragma once

#ifdef DBRX_WITH_CUDA

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dbrx::cli::bench {

// Mean milliseconds of fn() over `iters` runs after `warmup` runs, timed with CUDA events on `stream`
// (fn may synchronise internally; the events then still bracket it).
double time_ms(cudaStream_t stream, int warmup, int iters, const std::function<void()> &fn);

struct Ceilings {
    double read_bytes_per_s = 0;  // HBM read, measured with a streaming kernel over 4 GiB
    double gemm_flops_per_s = 0;  // cuBLAS bf16 GEMM 8192^3, fp32 accumulate
};
Ceilings measure_ceilings(cudaStream_t stream);

// One line of the table: our time against the hardware floor of the same work.
struct Row {
    std::string name;
    double ours_ms = 0;
    double floor_ms = 0;
    std::string basis;  // what the floor counts: "bytes 1.58 GB" or "FLOPs 2.1 T"
    std::string extra;  // e.g. the achieved TFLOP/s or TB/s
};
double floor_ms(double bytes, double flops, const Ceilings &c);
std::string bytes_flops_basis(double bytes, double flops, const Ceilings &c);

// Writes `doc` (indented, newline-terminated) to `path`; ApiError(DBRX_ERR_IO) when it cannot.
void write_json(const std::string &path, const nlohmann::json &doc);

// The share of n_experts experts a batch of `batch` tokens is expected to touch under uniform top-k
// routing (1 - P(an expert is chosen by no token)).
double expected_active_share(int32_t n_experts, int32_t top_k, double batch);

// B decode sequences: sequence b owns the per_seq blocks from b * per_seq and a prompt of ctx tokens
// drawn from tok(rng), sequence by sequence.
struct DecodeSequences {
    std::vector<std::vector<int32_t>> tables, prompts;
};
DecodeSequences decode_sequences(int32_t B, int32_t per_seq, int32_t ctx, std::mt19937 &rng,
                                 std::uniform_int_distribution<int32_t> &tok);

// Kernel-level figures (bench_cuda_kernels.cpp): one MoE layer at several token counts; attention
// prefill and paged decode.
void bench_moe(cudaStream_t stream, const Ceilings &c, bool quick, std::vector<Row> &rows);
void bench_attention_all(cudaStream_t stream, const Ceilings &c, bool quick, std::vector<Row> &rows);
// End-to-end figures through the CUDA backend on a synthetic model (bench_cuda_e2e.cpp).
void bench_end_to_end(int32_t layers, const Ceilings &c, bool quick, std::vector<Row> &rows);

}  // namespace dbrx::cli::bench

#endif
