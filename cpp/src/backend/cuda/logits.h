// Sampling summaries on the device (Backend::forward_summarized): per row of fp32 logits, the max,
// the sums of exponentials at temperature 1 and at the row's temperature, the counts of finite and
// NaN / +inf logits, and the top-n candidates, so that only ~0.5 KB per row crosses to the host
// instead of the 400 KB row. The CPU reference is engine/logits_summary.h; the results match it
// exactly except for the sums' rounding (another summation order, well within 1e-10).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "backend/cuda/cuda_util.h"
#include "model/backend.h"

namespace dbrx::cuda {

// Two kernels: per (row, chunk of 4096 logits) the chunk's statistics and top-n by a radix select on
// (float bits, id); then per row the merge of its chunks. Up to 64 chunks per row.
class LogitsReducer {
public:
    static constexpr int32_t kChunk = 4096;
    static constexpr int32_t kMaxChunks = 64;
    static bool supports(int32_t vocab) { return vocab > 0 && vocab <= kChunk * kMaxChunks; }

    // Enqueues on `stream` the summaries of rows logits[n_rows][vocab] (device memory) for `needs`
    // (one per row); read them with results() once the stream is synchronised.
    void enqueue(const float *logits, int32_t n_rows, int32_t vocab, std::span<const LogitsNeed> needs,
                 cudaStream_t stream);
    std::span<const LogitsSummary> results() const {
        return {host_out_.as<const LogitsSummary>(), static_cast<size_t>(n_rows_)};
    }
    // Rows and vocabulary of the last enqueue (for fetching a full row afterwards).
    int32_t n_rows() const { return n_rows_; }
    int32_t vocab() const { return vocab_; }

private:
    int32_t n_rows_ = 0, vocab_ = 0;
    PinnedBuffer host_needs_, host_out_;
    DeviceBuffer needs_, chunk_stats_, chunk_keys_, out_;
};

}  // namespace dbrx::cuda
