// The CUDA implementation of model/backend.h: weights resident in device memory, a paged bf16 KV
// pool, cuBLAS for the dense GEMMs and the backend's own kernels for the rest (kernels.h).
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/cuda/cuda_graph.h"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_model.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/logits.h"
#include "backend/cuda/moe.h"
#include "dist/cuda_rank_hooks.h"
#include "model/backend.h"

namespace dbrx::cuda {

class CudaKvPool final : public KvPool {
public:
    // In default_layout().
    CudaKvPool(const ModelConfig &c, int32_t n_blocks, int32_t block_size);
    CudaKvPool(const ModelConfig &c, int32_t n_blocks, int32_t block_size, KvLayout layout);
    // SlotMajor unless the environment sets DBRX_KV_LAYOUT=head (=slot: SlotMajor; anything else is
    // INVALID_ARGUMENT), for A/B measurements of the two layouts. Measured on the H200 (2026-11-29,
    // BENCHMARKS.md): slot-major decode attention 2-4 % faster at B=1 x 32768 and, with the longer
    // splits of the default mode, 1.8 % at B=64 x 8192; prefill equal.
    static KvLayout default_layout();
    int32_t n_blocks() const override { return n_blocks_; }
    int32_t block_size() const override { return block_size_; }
    KvLayout layout() const { return layout_; }
    KvLayer layer(int32_t l) const;
    static int64_t bytes_per_block(const ModelConfig &c, int32_t block_size);
    // Unique per pool in the process: CUDA graphs captured against one pool are never replayed on another.
    uint64_t serial() const { return serial_; }

private:
    int32_t n_blocks_, block_size_, n_kv_heads_, head_dim_;
    KvLayout layout_;
    uint64_t serial_;
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
    // returns n_out. Not serialised by itself: callers hold mutex_ (forward() does), read logits_
    // on stream() and synchronise stream() before the next step (the metadata staging is reused).
    // Steps made only of decodes run as CUDA graphs when graphs are on (cuda_graphs()).
    int32_t compute_logits(CudaKvPool &pool, std::span<const SeqStep> batch);
    const float *device_logits() const { return logits_.as<float>(); }
    // For tests: the last layer's queries (fp32 [T][H][hd], rotated) of the last step.
    const float *device_queries() const { return q_.as<float>(); }
    // Sampling summaries reduced on the device (cuda_backend_logits.cpp).
    bool forward_summarized(KvPool &pool, std::span<const SeqStep> batch, std::span<const LogitsNeed> needs,
                            std::span<LogitsSummary> out) override;
    void fetch_logits_row(int32_t i, float *dst) override;

    const DeviceModel &model() const { return *model_; }
    cudaStream_t stream() const { return stream_.get(); }
    // For tests and benchmarks: force the MoE path (Auto by default).
    void set_moe_path(MoePath p) {
        moe_path_ = p;
        graphs_.clear();  // graphs captured another path
    }
    // For tests: prefill chunks through the split-K kernel instead of flash attention.
    void set_flash_prefill(bool on) { flash_ = on; }
    // Which flash-attention kernel prefill chunks take: Auto (the default unless the environment sets
    // DBRX_FLASH_KERNEL=mma or =wgmma) is Hopper's wgmma kernel where it exists (head dim 128,
    // sm_90a), else the mma.sync one.
    enum class FlashKernel { Auto, MmaSync, Wgmma };
    void set_flash_kernel(FlashKernel k) { flash_kernel_ = k; }
    // Batch-invariant mode (dbrx_model_params.batch_invariant): every token through the same kernels
    // whatever the step holds - GEMMs and the MoE as GEMVs over groups of at most 8 tokens, attention
    // through the split-K kernel whose splits depend on the token's own context only - so a
    // sequence's logits are bitwise independent of batch, chunking and preemption.
    void set_batch_invariant(bool on);
    bool batch_invariant() const { return invariant_; }
    // CUDA graphs for decode steps: on unless the environment sets DBRX_CUDA_GRAPHS=0. Turning them
    // off drops the cached graphs; the logits are the same either way.
    void set_cuda_graphs(bool on);
    bool cuda_graphs() const { return graphs_on_; }
    GraphStats graph_stats() const { return graphs_.stats(); }
    // Whether a step of n_tokens decodes (one token per sequence) can be captured in a graph.
    bool graph_capturable(int32_t n_tokens) const;
    // For tests: called after each layer's MoE routing with the router logits of the step's tokens
    // ([T][E] fp32, on the host), so that a test can tell a routing near-tie from an error. Steps
    // then synchronise once per layer and run without CUDA graphs. Not for sharded ranks or
    // batch-invariant mode (UNSUPPORTED there); null clears it.
    using RouterProbe = std::function<void(int32_t layer, const std::vector<float> &logits, int32_t n_tokens)>;
    void set_router_probe(RouterProbe probe);
    // Makes this backend one rank of a sharded model (dist/sharded_cuda_backend.h): out_proj, the
    // MoE and lm_head go through the hooks (null: the plain backend). The hooks must outlive it.
    void set_rank_hooks(dist::CudaRankHooks *hooks) { hooks_ = hooks; }

private:
    // The pool as this backend's own type; INVALID_ARGUMENT for a pool of another backend.
    static CudaKvPool &own_pool(KvPool &pool);
    struct Step;  // host-side layout of one step's metadata
    void run_layers(const CudaKvPool &pool, const Step &step);
    void device_stage(const CudaKvPool &pool, const Step &step);  // embedding .. lm_head
    bool use_flash(int64_t chunk_tokens) const;

    std::unique_ptr<DeviceModel> model_;
    int32_t device_;
    Stream stream_;
    CublasHandle blas_;
    Moe moe_;
    MoePath moe_path_ = MoePath::Auto;
    bool flash_ = true;
    FlashKernel flash_kernel_;
    bool invariant_ = false;
    bool graphs_on_ = true;
    GraphCache graphs_;
    DeviceBuffer blas_workspace_;  // fixed, so that cuBLAS calls can be captured in graphs
    dist::CudaRankHooks *hooks_ = nullptr;
    RouterProbe probe_;
    std::mutex mutex_;
    PinnedBuffer host_meta_;
    LogitsReducer logits_reducer_;
    DeviceBuffer meta_, h_, x_, qkv_, q_, attn_, attn_scratch_, logits_;
};

std::unique_ptr<CudaBackend> make_cuda_backend_from(std::unique_ptr<DeviceModel> model, int32_t device_id);

}  // namespace dbrx::cuda
