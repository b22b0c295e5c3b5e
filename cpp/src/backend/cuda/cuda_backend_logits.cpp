// CudaBackend's side of sampling on the device: the step's logits stay in logits_, two kernels
// reduce each row to a LogitsSummary (backend/cuda/logits.h) and only the summaries cross to the
// host; a full row is copied on request when the engine cannot sample from its summary.
#include <algorithm>
#include <cstring>
#include <string>

#include "backend/cuda/cuda_backend.h"

namespace dbrx::cuda {

bool CudaBackend::forward_summarized(KvPool &pool_base, std::span<const SeqStep> batch,
                                     std::span<const LogitsNeed> needs, std::span<LogitsSummary> out) {
    const int32_t vocab = model_->config.vocab_size;
    // A rank of a sharded model hands lm_head to its hooks: leave those to forward().
    if (hooks_ || !LogitsReducer::supports(vocab)) return false;
    const size_t rows = static_cast<size_t>(
        std::count_if(batch.begin(), batch.end(), [](const SeqStep &s) { return s.want_logits; }));
    if (needs.size() != rows || out.size() != rows)
        invalid_argument("forward_summarized: " + std::to_string(needs.size()) + " needs and " +
                         std::to_string(out.size()) + " summaries for " + std::to_string(rows) + " output rows");
    std::lock_guard<std::mutex> lock(mutex_);
    const int32_t n_out = compute_logits(own_pool(pool_base), batch);
    logits_reducer_.enqueue(logits_.as<float>(), n_out, vocab, needs, stream_.get());
    DBRX_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    const std::span<const LogitsSummary> got = logits_reducer_.results();
    std::copy(got.begin(), got.end(), out.begin());
    return true;
}

void CudaBackend::fetch_logits_row(int32_t i, float *dst) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (i < 0 || i >= logits_reducer_.n_rows())
        invalid_argument("fetch_logits_row: row " + std::to_string(i) + " outside the " +
                         std::to_string(logits_reducer_.n_rows()) + " rows of the last summarised step");
    set_device(device_);
    const size_t vocab = static_cast<size_t>(logits_reducer_.vocab());
    DBRX_CUDA_CHECK(cudaMemcpyAsync(dst, logits_.as<float>() + static_cast<size_t>(i) * vocab, sizeof(float) * vocab,
                                    cudaMemcpyDeviceToHost, stream_.get()));
    DBRX_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
}

}  // namespace dbrx::cuda
