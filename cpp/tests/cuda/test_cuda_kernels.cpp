// Each CUDA kernel against the CPU backend's reference kernels on random inputs, at the real DBRX
// shapes (d_model 6144, 48/8 heads of 128, 16 experts of 10752, top-4) and the fixtures' shapes.
#include <gtest/gtest.h>

#include <cstdio>
#include <numeric>

#include "backend/cpu/kernels.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "kv_layout_test_util.h"

namespace dbrx::cuda::test {
namespace {

struct AttnShape {
    int32_t H, KV, hd;
    float clip;
};

// --- LayerNorm ---

class LayerNormTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(LayerNormTest, MatchesCpu) {
    const int32_t d = GetParam(), T = 7;
    auto x = uniform(static_cast<size_t>(T) * d, -3.f, 3.f, 1);
    for (int32_t t = 0; t < T; ++t) x[static_cast<size_t>(t) * d] += 5.f * t;  // shifted means
    auto w = to_bf16(uniform(d, 0.5f, 1.5f, 2));
    auto dx = to_device(x);
    auto dw = to_device(w);
    DeviceBuffer dy(sizeof(bf16_t) * T * d);
    layernorm(dx.as<float>(), nullptr, dw.as<bf16_t>(), dy.as<bf16_t>(), T, d, nullptr);
    auto got = to_f32(to_host<bf16_t>(dy.get(), static_cast<size_t>(T) * d));
    ThreadPool pool(0);
    std::vector<float> ref(x.size());
    cpu::layernorm(x.data(), w.data(), ref.data(), T, d, pool);
    const double err = rel_max_err(got, ref);
    std::printf("layernorm d=%d: max rel err %.2e\n", d, err);
    EXPECT_LT(err, 8e-3);  // bf16 output rounding
}

INSTANTIATE_TEST_SUITE_P(Shapes, LayerNormTest, ::testing::Values(6144, 256, 32));

// --- Wqkv epilogue (clamp + RoPE + KV write) and paged attention ---

struct SeqSpec {
    int32_t pos0, n_new;  // cached prefix length, new tokens
};

// Runs qkv_epilogue over every position of every sequence (filling the cache in `layout`), then
// attention for the last n_new tokens of each sequence, and compares with cpu::rope_apply +
// cpu::attend_one (over a slot-major copy of the cache).
void check_attention(const AttnShape &s, const std::vector<SeqSpec> &seqs, uint32_t seed, KvLayout layout) {
    const int32_t bs = 16, rows = (s.H + 2 * s.KV) * s.hd, d = s.H * s.hd;
    // Block tables: a shuffled permutation of the pool so sequences interleave.
    int32_t n_blocks = 0;
    for (const auto &q : seqs) n_blocks += (q.pos0 + q.n_new + bs - 1) / bs;
    std::vector<int32_t> perm(n_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), std::mt19937(seed));
    std::vector<int32_t> pos, seq, block_off, blocks = perm, new_pos, new_seq;
    int32_t boff = 0, max_ctx = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
        const int32_t len = seqs[i].pos0 + seqs[i].n_new;
        block_off.push_back(boff);
        boff += (len + bs - 1) / bs;
        max_ctx = std::max(max_ctx, len);
        for (int32_t p = 0; p < len; ++p) {
            pos.push_back(p);
            seq.push_back(static_cast<int32_t>(i));
            if (p >= seqs[i].pos0) {
                new_pos.push_back(p);
                new_seq.push_back(static_cast<int32_t>(i));
            }
        }
    }
    const int32_t T = static_cast<int32_t>(pos.size()), Tn = static_cast<int32_t>(new_pos.size());
    auto qkv = uniform(static_cast<size_t>(T) * rows, -2.f, 2.f, seed + 1);  // beyond the clip: exercises it
    auto inv = cpu::rope_inv_freq(s.hd, 500000.0);
    auto d_qkv = to_device(qkv);
    auto d_inv = to_device(inv);
    auto d_pos = to_device(pos), d_seq = to_device(seq), d_boff = to_device(block_off), d_blocks = to_device(blocks);
    auto d_npos = to_device(new_pos), d_nseq = to_device(new_seq);
    const int64_t half = static_cast<int64_t>(bs) * s.KV * s.hd;
    DeviceBuffer cache(sizeof(bf16_t) * n_blocks * 2 * half);
    const KvLayer kv = kv_layer(cache.as<bf16_t>(), bs, s.KV, s.hd, layout);
    const char *lname = kv_layout_name(layout);
    TokenMeta all{d_pos.as<int32_t>(), d_seq.as<int32_t>(), d_boff.as<int32_t>(), d_blocks.as<int32_t>()};
    DeviceBuffer q(sizeof(float) * T * d);
    qkv_epilogue(d_qkv.as<float>(), T, s.H, s.clip, d_inv.as<float>(), all, kv, q.as<float>(), nullptr);
    // The new tokens' queries, gathered on the host.
    auto q_all = to_host<float>(q.get(), static_cast<size_t>(T) * d);
    std::vector<float> q_new;
    for (int32_t t = 0; t < T; ++t)
        if (pos[t] >= seqs[seq[t]].pos0) q_new.insert(q_new.end(), q_all.begin() + int64_t{t} * d, q_all.begin() + int64_t{t + 1} * d);
    auto d_qnew = to_device(q_new);
    TokenMeta news{d_npos.as<int32_t>(), d_nseq.as<int32_t>(), d_boff.as<int32_t>(), d_blocks.as<int32_t>()};
    const int32_t splits = attention_splits(Tn, s.KV, max_ctx);
    DeviceBuffer scratch(attention_scratch_bytes(Tn, s.H, s.hd, splits));
    DeviceBuffer out(sizeof(bf16_t) * Tn * d);
    attention(d_qnew.as<float>(), Tn, s.H, news, kv, max_ctx, splits, scratch.get(), out.as<bf16_t>(), nullptr);
    auto got = to_f32(to_host<bf16_t>(out.get(), static_cast<size_t>(Tn) * d));
    const KvLayer slots = kv_shape(bs, s.KV, s.hd, KvLayout::SlotMajor);
    auto cache_h = to_f32(slot_major(to_host<bf16_t>(cache.get(), static_cast<size_t>(n_blocks) * 2 * half), n_blocks, kv));

    // CPU: clamp + RoPE per token; K/V cache as fp32 copies of the GPU's bf16 cache, checked first.
    std::vector<float> ref_q(static_cast<size_t>(T) * d), kcache(cache_h.size()), vcache(cache_h.size());
    std::vector<float> cs(s.hd / 2), sn(s.hd / 2);
    double kv_err = 0;
    for (int32_t t = 0; t < T; ++t) {
        std::vector<float> r(qkv.begin() + int64_t{t} * rows, qkv.begin() + int64_t{t + 1} * rows);
        if (s.clip > 0) cpu::clamp(r.data(), rows, s.clip);
        cpu::rope_cos_sin(pos[t], inv, cs.data(), sn.data());
        cpu::rope_apply(r.data(), s.H + s.KV, s.hd, cs.data(), sn.data());
        std::copy(r.begin(), r.begin() + d, ref_q.begin() + int64_t{t} * d);
        const int32_t b = blocks[block_off[seq[t]] + pos[t] / bs];
        const int64_t off = kv_offset(slots, b, pos[t] % bs, 0);  // the slot's KV heads, contiguous
        for (int32_t i = 0; i < s.KV * s.hd; ++i) {
            kv_err = std::max(kv_err, static_cast<double>(std::fabs(cache_h[off + i] - r[d + i])));
            kv_err = std::max(kv_err, static_cast<double>(std::fabs(cache_h[off + half + i] - r[d + s.KV * s.hd + i])));
        }
    }
    EXPECT_LT(rel_max_err(q_all, ref_q), 1e-5) << "queries after clamp + RoPE";
    EXPECT_LT(kv_err, 2.f * 4e-3) << "K/V written to the " << lname << " cache (bf16 of values within +-clip)";
    cpu::PagedKv pk{cache_h.data(), cache_h.data() + half, 2 * half, bs, s.KV, s.hd};
    std::vector<float> ref(static_cast<size_t>(Tn) * d), scores(max_ctx);
    const float scale = 1.f / std::sqrt(static_cast<float>(s.hd));
    for (int32_t t = 0; t < Tn; ++t) {
        const int32_t sq = new_seq[t];
        std::span<const int32_t> table(blocks.data() + block_off[sq], (seqs[sq].pos0 + seqs[sq].n_new + bs - 1) / bs);
        for (int32_t h = 0; h < s.H; ++h)
            cpu::attend_one(q_new.data() + (int64_t{t} * s.H + h) * s.hd, new_pos[t], pk, table, h / (s.H / s.KV),
                            scale, scores.data(), ref.data() + (int64_t{t} * s.H + h) * s.hd);
    }
    const double err = rel_max_err(got, ref);
    std::printf("attention H=%d KV=%d hd=%d %s KV tokens=%d splits=%d: max rel err %.2e\n", s.H, s.KV, s.hd, lname, Tn,
                splits, err);
    EXPECT_LT(err, 1e-2) << lname << " KV";

    // Flash prefill over the chunks long enough for it, compared on the rows it covers.
    if (!flash_prefill_supported(s.hd)) return;
    std::vector<int32_t> tiles, rows_covered;
    int32_t first = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
        if (seqs[i].n_new >= kFlashMinTokens)
            for (int32_t r = 0; r < seqs[i].n_new; r += kFlashTile) {
                const int32_t n = std::min(kFlashTile, seqs[i].n_new - r);
                tiles.insert(tiles.end(), {static_cast<int32_t>(i), first + r, n, seqs[i].pos0 + r});
                for (int32_t j = 0; j < n; ++j) rows_covered.push_back(first + r + j);
            }
        first += seqs[i].n_new;
    }
    if (tiles.empty()) return;
    auto d_tiles = to_device(tiles);
    DeviceBuffer fout(sizeof(bf16_t) * Tn * d);
    flash_prefill(d_qnew.as<float>(), static_cast<int32_t>(tiles.size() / 4), s.H, d_tiles.as<int32_t>(), news, kv,
                  fout.as<bf16_t>(), nullptr);
    auto fgot = to_f32(to_host<bf16_t>(fout.get(), static_cast<size_t>(Tn) * d));
    std::vector<float> fsel, rsel;
    for (int32_t t : rows_covered) {
        fsel.insert(fsel.end(), fgot.begin() + int64_t{t} * d, fgot.begin() + int64_t{t + 1} * d);
        rsel.insert(rsel.end(), ref.begin() + int64_t{t} * d, ref.begin() + int64_t{t + 1} * d);
    }
    const double ferr = rel_max_err(fsel, rsel);
    std::printf("flash prefill H=%d KV=%d hd=%d %s KV rows=%zu tiles=%zu: max rel err %.2e\n", s.H, s.KV, s.hd, lname,
                rows_covered.size(), tiles.size() / 4, ferr);
    EXPECT_LT(ferr, 2e-2) << lname << " KV";  // bf16 Q and P on the tensor cores
}

void check_both_layouts(const AttnShape &s, const std::vector<SeqSpec> &seqs, uint32_t seed) {
    for (KvLayout layout : kKvLayouts) check_attention(s, seqs, seed, layout);
}

TEST(CudaAttention, DbrxShapePrefillWithPrefix) {
    check_both_layouts({48, 8, 128, 1.5f}, {{0, 37}, {100, 29}}, 11);
}
TEST(CudaAttention, DbrxShapeDecodeLongContextSplit) {
    check_both_layouts({48, 8, 128, 1.5f}, {{2047, 1}, {700, 1}, {5, 1}}, 12);
}
TEST(CudaAttention, DbrxShapeLongChunksOverPrefix) {
    check_both_layouts({48, 8, 128, 1.5f}, {{0, 300}, {200, 100}, {1000, 17}}, 15);
}
TEST(CudaAttention, TinyFixtureShape) { check_both_layouts({2, 1, 128, 1.5f}, {{0, 130}, {60, 1}}, 13); }
TEST(CudaAttention, Cl100kFixtureShapeNoClip) { check_both_layouts({2, 1, 16, 0.f}, {{0, 70}, {8, 1}}, 14); }

// --- decode GEMV (y = x W^T for a few tokens, optionally added into y) ---

TEST(CudaGemv, MatchesCpuGemm) {
    struct Case { int32_t T, K, N; float beta; };
    for (const Case &c : {Case{1, 6144, 100352, 0.f}, Case{3, 6144, 8192, 0.f}, Case{8, 6144, 6144, 1.f},
                          Case{5, 6144, 16, 0.f}, Case{2, 256, 512, 1.f}, Case{7, 32, 100352, 0.f}}) {
        auto x = to_bf16(uniform(static_cast<size_t>(c.T) * c.K, -1.f, 1.f, 81 + c.T));
        auto w = to_bf16(uniform(static_cast<size_t>(c.N) * c.K, -0.05f, 0.05f, 82 + c.N));
        auto y0 = uniform(static_cast<size_t>(c.T) * c.N, -1.f, 1.f, 83);
        auto dx = to_device(x), dw = to_device(w), dy = to_device(y0);
        ASSERT_TRUE(gemv_supported(c.T, c.K));
        gemv_xwt(dx.as<bf16_t>(), c.T, c.K, dw.as<bf16_t>(), c.N, dy.as<float>(), c.beta, nullptr);
        auto got = to_host<float>(dy.get(), y0.size());
        ThreadPool pool(0);
        std::vector<float> ref(y0.size());
        auto xf = to_f32(x);
        cpu::gemm_xwt(xf.data(), c.T, c.K, w.data(), c.N, ref.data(), pool);
        for (size_t i = 0; i < ref.size(); ++i) ref[i] += c.beta * y0[i];
        const double err = rel_max_err(got, ref);
        std::printf("gemv T=%d K=%d N=%d beta=%.0f: max rel err %.2e\n", c.T, c.K, c.N, c.beta, err);
        EXPECT_LT(err, 1e-4);
    }
}

// --- router ---

TEST(CudaRouter, MatchesCpuRoute) {
    for (auto [E, k] : {std::pair{16, 4}, std::pair{4, 2}, std::pair{16, 1}}) {
        const int32_t T = 300;
        auto logits = uniform(static_cast<size_t>(T) * E, -4.f, 4.f, 21 + E + k);
        auto dl = to_device(logits);
        DeviceBuffer de(sizeof(int32_t) * T * k), dw(sizeof(float) * T * k);
        route_topk(dl.as<float>(), T, E, k, 1.f, de.as<int32_t>(), dw.as<float>(), nullptr);
        auto ge = to_host<int32_t>(de.get(), static_cast<size_t>(T) * k);
        auto gw = to_host<float>(dw.get(), static_cast<size_t>(T) * k);
        std::vector<int32_t> re(k);
        std::vector<float> rw(k);
        for (int32_t t = 0; t < T; ++t) {
            cpu::route(logits.data() + int64_t{t} * E, E, k, 1.0, re.data(), rw.data());
            for (int32_t r = 0; r < k; ++r) {
                ASSERT_EQ(ge[t * k + r], re[r]) << "token " << t << " rank " << r;
                ASSERT_NEAR(gw[t * k + r], rw[r], 1e-5) << "token " << t << " rank " << r;
            }
        }
    }
}

}  // namespace
}  // namespace dbrx::cuda::test
