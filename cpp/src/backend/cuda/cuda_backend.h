// The CUDA implementation of model/backend.h: weights resident in device memory, a paged bf16 KV
// pool, cuBLAS for the dense GEMMs and the backend's own kernels for the rest (kernels.h).
#pragma once

#include <memory>
#include <mutex>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_model.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/moe.h"
#include "dist/cuda_rank_hooks.h"
#include "model/backend.h"

namespace dbrx::cuda {

class CudaKvPool final : public KvPool {
public:
    CudaKvPool(const ModelConfig &c, int32_t n_blocks, int32_t block_size);
    int32_t n_blocks() const override { return n_blocks_; }
    int32_t block_size() const override { return block_size_; }
    KvLayer layer(int32_t l) const;
    static int64_t bytes_per_block(const ModelConfig &c, int32_t block_size);

private:
    int32_t n_blocks_, block_size_, n_kv_heads_, head_dim_;
    DeviceBuffer data_;
};

class CudaBackend final : public Backend {
public:
    CudaBackend(std::unique_ptr<DeviceModel> model, int32_t device_id);
    std::string name() const override { return "cuda"; }
    int64_t kv_bytes_per_block(int32_t block_size) const override;
    int64_t kv_memory_available() const override;
    std::unique_ptr<KvPool> create_kv_pool(int32_t n_blocks, int32_t block_size) override;
    void forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) override;
    // The device stage of forward(): runs the step on stream() and leaves the n_out logits rows
    // (fp32 [n_out][vocab], in batch order) in the device buffer logits_ without synchronising;
    // returns n_out. Not serialised by itself: callers hold mutex_ (forward() does) and read
    // logits_ on stream() before the next step.
    int32_t compute_logits(CudaKvPool &pool, std::span<const SeqStep> batch);
    const float *device_logits() const { return logits_.as<float>(); }

    const DeviceModel &model() const { return *model_; }
    cudaStream_t stream() const { return stream_.get(); }
    // For tests and benchmarks: force the MoE path (Auto by default).
    void set_moe_path(MoePath p) { moe_path_ = p; }
    // For tests: prefill chunks through the split-K kernel instead of flash attention.
    void set_flash_prefill(bool on) { flash_ = on; }
    // Makes this backend one rank of a sharded model (dist/sharded_cuda_backend.h): out_proj, the
    // MoE and lm_head go through the hooks (null: the plain backend). The hooks must outlive it.
    void set_rank_hooks(dist::CudaRankHooks *hooks) { hooks_ = hooks; }

private:
    struct Step;  // host-side layout of one step's metadata
    void run_layers(const CudaKvPool &pool, const Step &step);
    bool use_flash(int64_t chunk_tokens) const;

    std::unique_ptr<DeviceModel> model_;
    int32_t device_;
    Stream stream_;
    CublasHandle blas_;
    Moe moe_;
    MoePath moe_path_ = MoePath::Auto;
    bool flash_ = true;
    dist::CudaRankHooks *hooks_ = nullptr;
    std::mutex mutex_;
    PinnedBuffer host_meta_;
    DeviceBuffer meta_, h_, x_, qkv_, q_, attn_, attn_scratch_, logits_;
};

std::unique_ptr<CudaBackend> make_cuda_backend_from(std::unique_ptr<DeviceModel> model, int32_t device_id);

}  // namespace dbrx::cuda
