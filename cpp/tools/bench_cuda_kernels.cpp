// Kernel-level figures of `dbrx bench --synthetic dbrx`: one MoE layer at several token counts,
// prefill attention and paged decode attention, all at the real DBRX shape.
#ifdef DBRX_WITH_CUDA

#include <cstdio>
#include <numeric>
#include <random>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device_model.h"
#include "backend/cuda/flash_prefill_wgmma.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/moe.h"
#include "bench_cuda.h"

namespace dbrx::cli::bench {
namespace {

using namespace dbrx::cuda;

std::string rate(double v, const char *unit) {
    char b[48];
    std::snprintf(b, sizeof b, "%.1f %s", v, unit);
    return b;
}

}  // namespace

void bench_moe(cudaStream_t stream, const Ceilings &c, bool quick, std::vector<Row> &rows) {
    const ModelConfig cfg = dbrx_config(1);
    const int64_t d = cfg.d_model, F = cfg.ffn_hidden, E = cfg.n_experts, k = cfg.top_k;
    DeviceBuffer router(sizeof(bf16_t) * E * d), w13(sizeof(bf16_t) * E * 2 * F * d), w2(sizeof(bf16_t) * E * F * d);
    fill_uniform(router.as<bf16_t>(), E * d, 11, 0.f, 0.5f, stream);
    fill_uniform(w13.as<bf16_t>(), E * 2 * F * d, 12, 0.f, 0.0128f, stream);
    fill_uniform(w2.as<bf16_t>(), E * F * d, 13, 0.f, 0.0096f, stream);
    const int32_t max_t = quick ? 512 : 4096;
    DeviceBuffer x(sizeof(bf16_t) * max_t * d), h(sizeof(float) * max_t * d);
    fill_uniform(x.as<bf16_t>(), max_t * d, 14, 0.f, 1.f, stream);
    DBRX_CUDA_CHECK(cudaMemsetAsync(h.get(), 0, h.bytes(), stream));
    CublasHandle blas(stream);
    MoeShape s{static_cast<int32_t>(d), static_cast<int32_t>(F), static_cast<int32_t>(E), static_cast<int32_t>(k), 1.f};
    Moe moe(s);
    MoeWeights w{router.as<bf16_t>(), w13.as<bf16_t>(), w2.as<bf16_t>()};
    for (int32_t T : {1, 4, 8, 16, 64, 512, 4096}) {
        if (T > max_t) continue;
        const int iters = T <= 64 ? 50 : 10;
        const double ms = time_ms(stream, 3, iters, [&] {
            moe.forward(x.as<bf16_t>(), T, w, h.as<float>(), blas.get(), stream);
        });
        const int32_t active = moe.active_experts(stream);
        const double bytes = active * 3.0 * F * d * 2 + E * d * 2.0 + T * d * (2.0 + 8.0);
        const double flops = 2.0 * T * k * 3 * d * F + 2.0 * T * E * d;
        char name[64];
        std::snprintf(name, sizeof name, "MoE layer T=%d", T);
        rows.push_back({name, ms, floor_ms(bytes, flops, c), bytes_flops_basis(bytes, flops, c),
                        std::to_string(active) + " experts, " + rate(flops / (ms * 1e-3) / 1e12, "TFLOP/s") + ", " +
                            rate(bytes / (ms * 1e-3) / 1e12, "TB/s")});
        std::printf("%-44s %.4f ms\n", name, ms);
        std::fflush(stdout);
    }
}

namespace {

// A paged cache of `seqs` sequences of `ctx` positions (random contents) in `layout` and queries for
// the last `n_new` positions of each; times attention over it.
// Prefill rows time the kernel the backend picks (wgmma on Hopper at head dim 128) unless
// `mma_sync` asks for the portable mma.sync kernel.
void bench_attention(cudaStream_t stream, const Ceilings &c, const char *label, int32_t seqs, int32_t ctx,
                     int32_t n_new, std::vector<Row> &rows, KvLayout layout, bool mma_sync = false,
                     bool batch_invariant = false) {
    const ModelConfig cfg = dbrx_config(1);
    const int32_t H = cfg.n_heads, KV = cfg.n_kv_heads, hd = cfg.head_dim, bs = 16;
    const int32_t blocks_per = (ctx + bs - 1) / bs;
    const int64_t n_blocks = static_cast<int64_t>(blocks_per) * seqs;
    const int64_t block_elems = kv_layer(nullptr, bs, KV, hd, layout).block_stride;
    DeviceBuffer cache(sizeof(bf16_t) * n_blocks * block_elems, "bench KV cache");
    fill_uniform(cache.as<bf16_t>(), n_blocks * block_elems, 21, 0.f, 1.f, stream);
    std::vector<int32_t> pos, seq, boff(seqs), blocks(n_blocks);
    std::iota(blocks.begin(), blocks.end(), 0);
    for (int32_t s = 0; s < seqs; ++s) {
        boff[s] = s * blocks_per;
        for (int32_t p = ctx - n_new; p < ctx; ++p) {
            pos.push_back(p);
            seq.push_back(s);
        }
    }
    const int32_t T = static_cast<int32_t>(pos.size());
    std::vector<float> q(static_cast<size_t>(T) * H * hd);
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto &v : q) v = u(rng);
    auto up = [&](const void *src, size_t bytes) {
        DeviceBuffer b(bytes);
        DBRX_CUDA_CHECK(cudaMemcpy(b.get(), src, bytes, cudaMemcpyHostToDevice));
        return b;
    };
    DeviceBuffer dq = up(q.data(), q.size() * 4), dpos = up(pos.data(), pos.size() * 4),
                 dseq = up(seq.data(), seq.size() * 4), dboff = up(boff.data(), boff.size() * 4),
                 dblocks = up(blocks.data(), blocks.size() * 4);
    const KvLayer kv = kv_layer(cache.as<bf16_t>(), bs, KV, hd, layout);
    TokenMeta tm{dpos.as<int32_t>(), dseq.as<int32_t>(), dboff.as<int32_t>(), dblocks.as<int32_t>()};
    // Prefill chunks go through flash attention (tiles of kFlashTile queries), decodes through split-K.
    const bool flash = n_new >= kFlashMinTokens;
    std::vector<int32_t> tiles;
    for (int32_t sq = 0; sq < seqs && flash; ++sq)
        for (int32_t r = 0; r < n_new; r += kFlashTile)
            tiles.insert(tiles.end(), {sq, sq * n_new + r, std::min(kFlashTile, n_new - r), ctx - n_new + r});
    if (tiles.empty()) tiles.assign(4, 0);  // unused placeholder: keeps the upload non-empty
    DeviceBuffer dtiles = up(tiles.data(), tiles.size() * 4);
    const int32_t splits = flash ? 1 : attention_splits(T, KV, ctx);
    DeviceBuffer scratch(attention_scratch_bytes(T, H, hd, splits));
    DeviceBuffer out(sizeof(bf16_t) * T * H * hd);
    const bool wgmma = flash && !mma_sync && flash_prefill_wgmma_supported(hd, bs);
    const double ms = time_ms(stream, 2, n_new > 1 ? 5 : 50, [&] {
        if (flash)
            (wgmma ? flash_prefill_wgmma : flash_prefill)(dq.as<float>(), static_cast<int32_t>(tiles.size() / 4), H,
                                                           dtiles.as<int32_t>(), tm, kv, out.as<bf16_t>(), stream);
        else
            attention(dq.as<float>(), T, H, tm, kv, ctx, splits, scratch.get(), out.as<bf16_t>(), stream, nullptr,
                      batch_invariant);
    });
    // Keys each query reads: causal over the whole context.
    double key_reads = 0;
    for (int32_t p : pos) key_reads += p + 1;
    const double flops = 4.0 * hd * H * key_reads;
    const double bytes = static_cast<double>(seqs) * ctx * KV * hd * 2 * 2 + T * H * hd * (4.0 + 2.0);
    rows.push_back({label, ms, floor_ms(bytes, flops, c), bytes_flops_basis(bytes, flops, c),
                    rate(flops / (ms * 1e-3) / 1e12, "TFLOP/s") + ", " + rate(bytes / (ms * 1e-3) / 1e12, "TB/s") +
                        (flash ? (wgmma ? ", flash (wgmma)" : ", flash (mma.sync)") : ", split-K x" + std::to_string(splits)) +
                        ", " + kv_layout_name(layout) + " KV"});
    std::printf("%-44s %.4f ms\n", label, ms);
    std::fflush(stdout);
}

}  // namespace

// The rows without a layout in their label use the KV pool's default layout (DBRX_KV_LAYOUT); the
// ", head-major KV" rows time the other layout for the A/B.
void bench_attention_all(cudaStream_t stream, const Ceilings &c, bool quick, std::vector<Row> &rows) {
    const KvLayout pool = CudaKvPool::default_layout(), other = KvLayout::HeadMajor;
    bench_attention(stream, c, "attention decode B=1 ctx=4096", 1, 4096, 1, rows, pool);
    bench_attention(stream, c, "attention decode B=1 ctx=32768", 1, 32768, 1, rows, pool);
    bench_attention(stream, c, "attention decode B=1 ctx=32768, head-major KV", 1, 32768, 1, rows, other);
    bench_attention(stream, c, "attention decode B=64 ctx=8192", 64, 8192, 1, rows, pool);
    bench_attention(stream, c, "attention decode B=64 ctx=8192, head-major KV", 64, 8192, 1, rows, other);
    bench_attention(stream, c, "attention decode B=64 ctx=8192, batch-invariant mode", 64, 8192, 1, rows, pool, false,
                    true);
    bench_attention(stream, c, "attention prefill causal S=4096", 1, 4096, 4096, rows, pool);
    bench_attention(stream, c, "attention prefill causal S=4096, head-major KV", 1, 4096, 4096, rows, other);
    bench_attention(stream, c, "attention prefill causal S=4096, mma.sync kernel", 1, 4096, 4096, rows, pool, true);
    if (!quick) bench_attention(stream, c, "attention prefill causal S=16384", 1, 16384, 16384, rows, pool);
    if (!quick)
        bench_attention(stream, c, "attention prefill causal S=16384, mma.sync kernel", 1, 16384, 16384, rows, pool,
                        true);
}

}  // namespace dbrx::cli::bench

#endif
