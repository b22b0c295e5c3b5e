#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "backend/cuda/flash_prefill_wgmma.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {

namespace {
// Decode steps as CUDA graphs: at most this many graphs cached, steps of at most this many tokens,
// and attention's context bound rounded up to a power of two of at least kMinCtxBucket.
constexpr size_t kGraphCapacity = 64;
constexpr int32_t kGraphMaxTokens = 512;
constexpr int32_t kMinCtxBucket = 256;
// cuBLAS's recommended workspace on Hopper; fixed so that captured GEMMs never allocate.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

std::atomic<uint64_t> g_next_pool_serial{1};

int32_t ctx_bucket(int32_t max_ctx) {
    return static_cast<int32_t>(std::bit_ceil(static_cast<uint32_t>(std::max(max_ctx, kMinCtxBucket))));
}

bool graphs_from_env() {
    const char *v = std::getenv("DBRX_CUDA_GRAPHS");
    if (!v) return true;
    const std::string_view s(v);
    return !(s == "0" || s == "false" || s == "off");
}

CudaBackend::FlashKernel flash_kernel_from_env() {
    const char *v = std::getenv("DBRX_FLASH_KERNEL");
    const std::string_view s(v ? v : "");
    if (s == "mma" || s == "mma.sync") return CudaBackend::FlashKernel::MmaSync;
    if (s == "wgmma") return CudaBackend::FlashKernel::Wgmma;
    return CudaBackend::FlashKernel::Auto;
}

MoeShape moe_shape(const ModelConfig &c) {
    MoeShape s;
    s.d_model = c.d_model;
    s.ffn = c.ffn_hidden;
    s.n_experts = c.n_experts;
    s.top_k = c.top_k;
    s.norm_p = c.moe_norm_p ? static_cast<float>(*c.moe_norm_p) : 0.f;
    return s;
}
}  // namespace

// ---- KV pool: one allocation, per layer per block K then V in the pool's KvLayout, bf16 ----

KvLayout CudaKvPool::default_layout() {
    const char *v = std::getenv("DBRX_KV_LAYOUT");
    const std::string_view s(v ? v : "");
    if (s.empty() || s == "slot") return KvLayout::SlotMajor;
    if (s == "head") return KvLayout::HeadMajor;
    invalid_argument("DBRX_KV_LAYOUT must be 'head' or 'slot', not '" + std::string(s) + "'");
}

int64_t CudaKvPool::bytes_per_block(const ModelConfig &c, int32_t bs) {
    return static_cast<int64_t>(c.n_layers) * 2 * bs * c.n_kv_heads * c.head_dim * sizeof(bf16_t);
}

CudaKvPool::CudaKvPool(const ModelConfig &c, int32_t n_blocks, int32_t block_size)
    : CudaKvPool(c, n_blocks, block_size, default_layout()) {}

CudaKvPool::CudaKvPool(const ModelConfig &c, int32_t n_blocks, int32_t block_size, KvLayout layout)
    : n_blocks_(n_blocks), block_size_(block_size), n_kv_heads_(c.n_kv_heads), head_dim_(c.head_dim), layout_(layout),
      serial_(g_next_pool_serial.fetch_add(1)) {
    if (n_blocks <= 0 || block_size <= 0)
        invalid_argument("KV pool needs n_blocks > 0 and block_size > 0, got " + std::to_string(n_blocks) + " x " +
                         std::to_string(block_size));
    data_ = DeviceBuffer(static_cast<size_t>(bytes_per_block(c, block_size)) * n_blocks, "KV pool");
    std::fprintf(stderr, "dbrx: CUDA KV pool: %d blocks of %d tokens, %s, %.2f GiB of device memory\n", n_blocks,
                 block_size, kv_layout_name(layout_), static_cast<double>(data_.bytes()) / (1 << 30));
}

KvLayer CudaKvPool::layer(int32_t l) const {
    KvLayer k = kv_layer(data_.as<bf16_t>(), block_size_, n_kv_heads_, head_dim_, layout_);
    k.base += static_cast<int64_t>(l) * n_blocks_ * k.block_stride;
    return k;
}

// ---- backend ----

struct CudaBackend::Step {
    int32_t n_tokens = 0, n_seqs = 0, n_blocks = 0, n_out = 0, max_ctx = 0;
    // Decode-only steps that graphs may capture; attention's context bound (bucketed for those).
    bool graph = false;
    int32_t attn_ctx = 0;
    // Attention: tokens of short chunks and decodes (split-K kernel) and tiles of long chunks (flash).
    int32_t n_dec = 0, n_tiles = 0;
    // offsets (in int32) of each array inside the metadata buffer; the block tables come last so
    // that every other offset depends only on the step's shape (a captured graph bakes them in)
    int64_t ids = 0, pos = 0, seq = 0, block_off = 0, blocks = 0, out_rows = 0, dec = 0, tiles = 0, total = 0;
};

CudaBackend::CudaBackend(std::unique_ptr<DeviceModel> model, int32_t device_id)
    : model_(std::move(model)), device_(device_id), blas_(stream_.get()), moe_(moe_shape(model_->config)),
      flash_kernel_(flash_kernel_from_env()), graphs_on_(graphs_from_env()), graphs_(kGraphCapacity) {
    const ModelConfig &c = model_->config;
    set_device(device_);
    blas_workspace_ = DeviceBuffer(kCublasWorkspaceBytes, "cuBLAS workspace");
    DBRX_CUBLAS_CHECK(cublasSetWorkspace(blas_.get(), blas_workspace_.get(), blas_workspace_.bytes()));
    if (c.d_model % 8 != 0) fail(DBRX_ERR_UNSUPPORTED, "CUDA backend: d_model must be a multiple of 8");
    if (c.head_dim % 2 != 0 || c.head_dim > 256)
        fail(DBRX_ERR_UNSUPPORTED, "CUDA backend: head_dim must be even and <= 256");
}

void CudaBackend::set_cuda_graphs(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    graphs_on_ = on;
    if (!on) graphs_.clear();
}

void CudaBackend::set_batch_invariant(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (on && hooks_ != nullptr)
        fail(DBRX_ERR_UNSUPPORTED, "batch-invariant mode is not available for a sharded (tp/ep) CUDA model");
    if (on && probe_) fail(DBRX_ERR_UNSUPPORTED, "batch-invariant mode: clear the router probe first");
    invariant_ = on;
    graphs_.clear();  // graphs captured the other kernels
}

void CudaBackend::set_router_probe(RouterProbe probe) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (probe && (hooks_ != nullptr || invariant_))
        fail(DBRX_ERR_UNSUPPORTED, "router probe: not available for a sharded rank or in batch-invariant mode");
    probe_ = std::move(probe);
}

bool CudaBackend::graph_capturable(int32_t n_tokens) const {
    if (n_tokens <= 0 || n_tokens > kGraphMaxTokens || probe_) return false;
    // Ranks of a sharded model: their hooks run the MoE and the collectives, and know whether those
    // can be captured (NCCL enqueued on stream_, no host round trip).
    if (hooks_ != nullptr) return hooks_->capturable(n_tokens);
    if (invariant_) return true;  // GEMV groups only: no host round trip
    // The cuBLAS MoE path reads expert offsets back to the host, which a capture cannot hold.
    switch (moe_path_) {
        case MoePath::Auto: return moe_.capturable(n_tokens);
        case MoePath::Gemv: return n_tokens <= kMoeGemvMaxRows;
        case MoePath::Grouped: return true;
        case MoePath::Gemm: return false;
    }
    return false;
}

bool CudaBackend::use_flash(int64_t chunk_tokens) const {
    return flash_ && !invariant_ && chunk_tokens >= kFlashMinTokens && flash_prefill_supported(model_->config.head_dim);
}

int64_t CudaBackend::kv_bytes_per_block(int32_t block_size) const {
    return CudaKvPool::bytes_per_block(model_->config, block_size);
}

int64_t CudaBackend::kv_memory_available() const {
    set_device(device_);
    size_t free_b = 0, total_b = 0;
    DBRX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    // Keep room for activations and cuBLAS workspaces: 2 GiB or 5 % of the card, whichever is more.
    const int64_t reserve = std::max<int64_t>(int64_t{2} << 30, static_cast<int64_t>(total_b / 20));
    return std::max<int64_t>(0, static_cast<int64_t>(free_b) - reserve);
}

std::unique_ptr<KvPool> CudaBackend::create_kv_pool(int32_t n_blocks, int32_t block_size) {
    std::lock_guard<std::mutex> lock(mutex_);
    set_device(device_);
    return std::make_unique<CudaKvPool>(model_->config, n_blocks, block_size);
}

CudaKvPool &CudaBackend::own_pool(KvPool &pool) {
    auto *p = dynamic_cast<CudaKvPool *>(&pool);
    if (!p) invalid_argument("CUDA backend: the KV pool was not created by this backend");
    return *p;
}

void CudaBackend::forward(KvPool &pool_base, std::span<const SeqStep> batch, float *logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int32_t n_out = compute_logits(own_pool(pool_base), batch);
    if (n_out > 0)
        DBRX_CUDA_CHECK(cudaMemcpyAsync(logits, logits_.get(), sizeof(float) * n_out * model_->config.vocab_size,
                                        cudaMemcpyDeviceToHost, stream_.get()));
    DBRX_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
}

int32_t CudaBackend::compute_logits(CudaKvPool &pool_ref, std::span<const SeqStep> batch) {
    set_device(device_);
    CudaKvPool *pool = &pool_ref;
    const ModelConfig &c = model_->config;
    const int32_t bs = pool->block_size();

    // Validate and lay out the step's metadata in one pinned buffer (one upload).
    Step st;
    st.n_seqs = static_cast<int32_t>(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
        const SeqStep &s = batch[i];
        const int64_t n = static_cast<int64_t>(s.tokens.size());
        if (n == 0) invalid_argument("forward: sequence " + std::to_string(i) + " has no tokens");
        if (s.pos0 < 0) invalid_argument("forward: sequence " + std::to_string(i) + " has pos0 < 0");
        const int64_t end = s.pos0 + n;
        if (end > static_cast<int64_t>(s.blocks.size()) * bs)
            invalid_argument("forward: sequence " + std::to_string(i) + " needs " + std::to_string(end) +
                             " positions but its block table covers " + std::to_string(s.blocks.size() * bs));
        for (int32_t b : s.blocks)
            if (b < 0 || b >= pool->n_blocks())
                invalid_argument("forward: sequence " + std::to_string(i) + " names KV block " + std::to_string(b) +
                                 " outside the pool of " + std::to_string(pool->n_blocks()));
        for (int32_t t : s.tokens)
            if (t < 0 || t >= c.vocab_size)
                invalid_argument("forward: token id " + std::to_string(t) + " outside the vocabulary of " +
                                 std::to_string(c.vocab_size));
        st.n_tokens += static_cast<int32_t>(n);
        st.n_blocks += static_cast<int32_t>(s.blocks.size());
        st.n_out += s.want_logits ? 1 : 0;
        st.max_ctx = std::max<int32_t>(st.max_ctx, static_cast<int32_t>(end));
        if (use_flash(n)) st.n_tiles += static_cast<int32_t>((n + kFlashTile - 1) / kFlashTile);
        else st.n_dec += static_cast<int32_t>(n);
    }
    if (st.n_tokens == 0) return 0;
    st.graph = st.n_tokens == st.n_seqs && graph_capturable(st.n_tokens);
    st.attn_ctx = st.graph ? ctx_bucket(st.max_ctx) : st.max_ctx;
    st.ids = 0;
    st.pos = st.ids + st.n_tokens;
    st.seq = st.pos + st.n_tokens;
    st.block_off = st.seq + st.n_tokens;
    st.out_rows = st.block_off + st.n_seqs;
    st.dec = st.out_rows + st.n_out;
    st.tiles = st.dec + st.n_dec;
    st.blocks = st.tiles + 4 * int64_t{st.n_tiles};
    st.total = st.blocks + st.n_blocks;
    host_meta_.reserve(st.total * sizeof(int32_t));
    int32_t *hm = host_meta_.as<int32_t>();
    int32_t t = 0, boff = 0, o = 0, nd = 0, nt = 0;
    for (int32_t i = 0; i < st.n_seqs; ++i) {
        const SeqStep &s = batch[i];
        const int32_t n = static_cast<int32_t>(s.tokens.size());
        if (use_flash(n)) {
            for (int32_t r = 0; r < n; r += kFlashTile, ++nt) {
                int32_t *tile = hm + st.tiles + 4 * int64_t{nt};
                tile[0] = i;
                tile[1] = t + r;
                tile[2] = std::min(kFlashTile, n - r);
                tile[3] = s.pos0 + r;
            }
        } else {
            for (int32_t r = 0; r < n; ++r) hm[st.dec + nd++] = t + r;
        }
        hm[st.block_off + i] = boff;
        std::memcpy(hm + st.blocks + boff, s.blocks.data(), s.blocks.size() * sizeof(int32_t));
        boff += static_cast<int32_t>(s.blocks.size());
        for (size_t j = 0; j < s.tokens.size(); ++j, ++t) {
            hm[st.ids + t] = s.tokens[j];
            hm[st.pos + t] = s.pos0 + static_cast<int32_t>(j);
            hm[st.seq + t] = i;
        }
        if (s.want_logits) hm[st.out_rows + o++] = t - 1;
    }
    // Grown in powers of two: every move of this buffer drops the captured graphs.
    meta_.reserve(std::bit_ceil(static_cast<uint64_t>(st.total * sizeof(int32_t))), "step metadata");
    DBRX_CUDA_CHECK(cudaMemcpyAsync(meta_.get(), hm, st.total * sizeof(int32_t), cudaMemcpyHostToDevice, stream_.get()));

    if (st.graph && graphs_on_) {
        const GraphKey key{st.n_tokens, st.n_out, st.attn_ctx};
        graphs_.run(
            key, stream_.get(),
            [&] { return GraphValidity{device_allocation_epoch(device_), pool->serial()}; },
            [&] { device_stage(*pool, st); });
    } else {
        device_stage(*pool, st);
    }
    return st.n_out;
}

void CudaBackend::device_stage(const CudaKvPool &pool, const Step &st) {
    const ModelConfig &c = model_->config;
    run_layers(pool, st);
    if (st.n_out > 0) {
        const int32_t *m = meta_.as<int32_t>();
        x_.reserve(sizeof(bf16_t) * st.n_out * c.d_model, "activations");
        logits_.reserve(sizeof(float) * st.n_out * static_cast<size_t>(c.vocab_size), "logits");
        layernorm(h_.as<float>(), m + st.out_rows, model_->norm_f.as<bf16_t>(), x_.as<bf16_t>(), st.n_out, c.d_model,
                  stream_.get());
        if (hooks_) hooks_->lm_head(x_.as<bf16_t>(), st.n_out, logits_.as<float>(), blas_.get(), stream_.get());
        else
            (invariant_ ? gemm_xwt_invariant : gemm_xwt)(blas_.get(), x_.as<bf16_t>(), st.n_out, c.d_model,
                                                         model_->lm_head.as<bf16_t>(), c.vocab_size, logits_.as<float>(),
                                                         0.f);
    }
}

void CudaBackend::run_layers(const CudaKvPool &pool, const Step &st) {
    const ModelConfig &c = model_->config;
    const int32_t T = st.n_tokens, d = c.d_model, H = c.n_heads;
    cudaStream_t s = stream_.get();
    const int32_t *m = meta_.as<int32_t>();
    TokenMeta tm;
    tm.pos = m + st.pos;
    tm.seq = m + st.seq;
    tm.block_off = m + st.block_off;
    tm.blocks = m + st.blocks;
    const int32_t splits = attention_splits(st.n_dec, c.n_kv_heads, st.attn_ctx);

    h_.reserve(sizeof(float) * T * d, "residual stream");
    x_.reserve(sizeof(bf16_t) * T * d, "activations");
    qkv_.reserve(sizeof(float) * T * c.qkv_rows(), "qkv");
    q_.reserve(sizeof(float) * T * d, "queries");
    attn_.reserve(sizeof(bf16_t) * T * d, "attention output");
    attn_scratch_.reserve(std::max<size_t>(1, attention_scratch_bytes(st.n_dec, H, c.head_dim, splits)),
                          "attention partials");
    const int32_t *dec_list = st.n_dec == T ? nullptr : m + st.dec;
    const float clip = c.clip_qkv ? *c.clip_qkv : 0.f;

    const auto gemm = invariant_ ? gemm_xwt_invariant : gemm_xwt;
    // Hopper's warpgroup-MMA prefill kernel where it exists (head dim 128, sm_90a): 1.3-1.5x the
    // mma.sync one at S = 4096..16384 on the H200, same tiles and semantics.
    const bool wgmma = st.n_tiles > 0 && flash_kernel_ != FlashKernel::MmaSync &&
                       (flash_kernel_ == FlashKernel::Wgmma || flash_prefill_wgmma_supported(c.head_dim, pool.block_size()));
    embed(m + st.ids, model_->wte.as<bf16_t>(), h_.as<float>(), T, d, s);
    for (int32_t l = 0; l < c.n_layers; ++l) {
        const DeviceLayer &L = model_->layers[l];
        const KvLayer kv = pool.layer(l);
        layernorm(h_.as<float>(), nullptr, L.norm_1.as<bf16_t>(), x_.as<bf16_t>(), T, d, s);
        gemm(blas_.get(), x_.as<bf16_t>(), T, d, L.wqkv.as<bf16_t>(), (H + 2 * c.n_kv_heads) * c.head_dim,
             qkv_.as<float>(), 0.f);  // == qkv_rows() unsharded; a rank's heads only when sharded
        qkv_epilogue(qkv_.as<float>(), T, H, clip, model_->inv_freq.as<float>(), tm, kv, q_.as<float>(), s);
        if (st.n_dec > 0)
            attention(q_.as<float>(), st.n_dec, H, tm, kv, st.attn_ctx, splits, attn_scratch_.get(), attn_.as<bf16_t>(), s,
                      dec_list, invariant_);
        if (st.n_tiles > 0)
            (wgmma ? flash_prefill_wgmma : flash_prefill)(q_.as<float>(), st.n_tiles, H, m + st.tiles, tm, kv,
                                                           attn_.as<bf16_t>(), s);
        if (hooks_) hooks_->out_proj(l, attn_.as<bf16_t>(), T, h_.as<float>(), blas_.get(), s);
        else gemm(blas_.get(), attn_.as<bf16_t>(), T, d, L.out_proj.as<bf16_t>(), d, h_.as<float>(), 1.f);
        layernorm(h_.as<float>(), nullptr, L.norm_2.as<bf16_t>(), x_.as<bf16_t>(), T, d, s);
        MoeWeights mw;
        mw.router = L.router.as<bf16_t>();
        mw.w13 = L.w13.as<bf16_t>();
        mw.w2 = L.w2.as<bf16_t>();
        if (hooks_) hooks_->moe(l, x_.as<bf16_t>(), T, h_.as<float>(), blas_.get(), s);
        else if (!invariant_) {
            moe_.forward(x_.as<bf16_t>(), T, mw, h_.as<float>(), blas_.get(), s, moe_path_);
            if (probe_) {
                std::vector<float> lg(static_cast<size_t>(T) * c.n_experts);
                DBRX_CUDA_CHECK(cudaMemcpyAsync(lg.data(), moe_.router_logits(), lg.size() * sizeof(float),
                                                cudaMemcpyDeviceToHost, s));
                DBRX_CUDA_CHECK(cudaStreamSynchronize(s));
                probe_(l, lg, T);
            }
        }
        else
            for (int32_t t0 = 0; t0 < T; t0 += kMoeGemvMaxRows)  // the GEMV path, per group of tokens
                moe_.forward(x_.as<bf16_t>() + int64_t{t0} * d, std::min(kMoeGemvMaxRows, T - t0), mw,
                             h_.as<float>() + int64_t{t0} * d, blas_.get(), s, MoePath::Gemv);
    }
}

std::unique_ptr<CudaBackend> make_cuda_backend_from(std::unique_ptr<DeviceModel> model, int32_t device_id) {
    return std::make_unique<CudaBackend>(std::move(model), device_id);
}

}  // namespace dbrx::cuda

namespace dbrx {

std::unique_ptr<Backend> make_cuda_backend(const Checkpoint &ckpt, const BackendOptions &options,
                                           bool (*progress)(float, void *), void *progress_user) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        fail(DBRX_ERR_UNSUPPORTED, "no CUDA device is visible (cudaGetDeviceCount found none)");
    }
    if (options.device_id < 0 || options.device_id >= n)
        invalid_argument("CUDA device " + std::to_string(options.device_id) + " does not exist (" + std::to_string(n) +
                         " visible)");
    cuda::set_device(options.device_id);
    auto backend = cuda::make_cuda_backend_from(cuda::upload_model(ckpt, progress, progress_user), options.device_id);
    backend->set_batch_invariant(options.batch_invariant);
    return backend;
}

}  // namespace dbrx
