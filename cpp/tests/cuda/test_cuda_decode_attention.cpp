// Paged decode attention (attention(): the tensor-core kernel and the generic one) against
// cpu::attend_one on random bf16 caches: the DBRX shape from 1 to 32768 keys, a batch of 64 mixed
// contexts, short prefill chunks, tok_list, the fixtures' and other group sizes, and bitwise batch
// invariance (a token's output bytes do not depend on the rest of the launch or on max_ctx).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <numeric>
#include <span>

#include "backend/cpu/kernels.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"

namespace dbrx::cuda::test {
namespace {

struct Shape {
    int32_t H, KV, hd;
};
constexpr int32_t kBs = 16;
constexpr Shape kDbrx{48, 8, 128};

struct Tok {
    int32_t seq, pos;
};

// Fast deterministic uniform [-1, 1) values (the 32768-key caches hold 10^8 of them).
struct Rng {
    uint64_t s;
    float next() {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return static_cast<float>(static_cast<int32_t>(s >> 32)) * (1.0f / 2147483648.0f);
    }
};

// A paged cache of sequences with lens[s] positions each, blocks shuffled across the pool; the slots
// past a sequence's end hold NaN, so a kernel that read them would show it in its output.
class Cache {
public:
    Cache(Shape s, std::vector<int32_t> lens, uint32_t seed) : shape_(s), lens_(std::move(lens)) {
        int32_t n_blocks = 0;
        for (int32_t len : lens_) {
            block_off_.push_back(n_blocks);
            n_blocks += (len + kBs - 1) / kBs;
        }
        blocks_.resize(n_blocks);
        std::iota(blocks_.begin(), blocks_.end(), 0);
        std::shuffle(blocks_.begin(), blocks_.end(), std::mt19937(seed));
        const int64_t half = this->half(), row = int64_t{s.KV} * s.hd;
        std::vector<bf16_t> data(static_cast<size_t>(n_blocks) * 2 * half, float_to_bf16(NAN));
        Rng rng{seed};
        for (size_t q = 0; q < lens_.size(); ++q)
            for (int32_t p = 0; p < lens_[q]; ++p) {
                const int64_t off = blocks_[block_off_[q] + p / kBs] * 2 * half + (p % kBs) * row;
                for (int64_t i = 0; i < row; ++i) {
                    data[off + i] = float_to_bf16(rng.next());
                    data[off + half + i] = float_to_bf16(rng.next());
                }
            }
        host_ = to_f32(data);
        dev_ = to_device(data);
        d_boff_ = to_device(block_off_);
        d_blocks_ = to_device(blocks_);
    }
    int64_t half() const { return int64_t{kBs} * shape_.KV * shape_.hd; }
    Shape shape() const { return shape_; }
    KvLayer layer() const { return {dev_.as<bf16_t>(), 2 * half(), half(), kBs, shape_.KV, shape_.hd}; }
    const int32_t *d_boff() const { return d_boff_.as<int32_t>(); }
    const int32_t *d_blocks() const { return d_blocks_.as<int32_t>(); }

    // cpu::attend_one for every head of one token.
    std::vector<float> reference(const Tok &t, const float *q) const {
        const Shape s = shape_;
        cpu::PagedKv pk{host_.data(), host_.data() + half(), 2 * half(), kBs, s.KV, s.hd};
        std::span<const int32_t> table(blocks_.data() + block_off_[t.seq], (lens_[t.seq] + kBs - 1) / kBs);
        std::vector<float> out(static_cast<size_t>(s.H) * s.hd), scores(t.pos + 1);
        const float scale = 1.f / std::sqrt(static_cast<float>(s.hd));
        for (int32_t h = 0; h < s.H; ++h)
            cpu::attend_one(q + int64_t{h} * s.hd, t.pos, pk, table, h / (s.H / s.KV), scale, scores.data(),
                            out.data() + int64_t{h} * s.hd);
        return out;
    }

private:
    Shape shape_;
    std::vector<int32_t> lens_, block_off_, blocks_;
    std::vector<float> host_;
    DeviceBuffer dev_, d_boff_, d_blocks_;
};

std::vector<float> queries(const Shape &s, size_t n_tokens, uint32_t seed) {
    // Wider than the keys: softmaxes from flat to peaked.
    return uniform(n_tokens * s.H * s.hd, -3.f, 3.f, seed);
}

// One attention() launch over `toks` (optionally restricted to tok_list) with the grid bound from
// max_ctx; returns the whole output, whose unlisted tokens keep the 0xFFFF (NaN) fill.
std::vector<bf16_t> run(const Cache &c, const std::vector<Tok> &toks, const std::vector<float> &q, int32_t max_ctx,
                        const std::vector<int32_t> &tok_list = {}) {
    const Shape s = c.shape();
    std::vector<int32_t> pos, seq;
    for (const Tok &t : toks) {
        pos.push_back(t.pos);
        seq.push_back(t.seq);
    }
    auto d_pos = to_device(pos), d_seq = to_device(seq), d_q = to_device(q), d_list = to_device(tok_list);
    const TokenMeta tm{d_pos.as<int32_t>(), d_seq.as<int32_t>(), c.d_boff(), c.d_blocks()};
    const int32_t n = tok_list.empty() ? static_cast<int32_t>(toks.size()) : static_cast<int32_t>(tok_list.size());
    const int32_t splits = attention_splits(n, s.KV, max_ctx);
    DeviceBuffer scratch(std::max<size_t>(1, attention_scratch_bytes(n, s.H, s.hd, splits)));
    const size_t n_out = toks.size() * s.H * s.hd;
    DeviceBuffer out(sizeof(bf16_t) * n_out);
    DBRX_CUDA_CHECK(cudaMemset(out.get(), 0xff, out.bytes()));
    attention(d_q.as<float>(), n, s.H, tm, c.layer(), max_ctx, splits, scratch.get(), out.as<bf16_t>(), nullptr,
              tok_list.empty() ? nullptr : d_list.as<int32_t>());
    return to_host<bf16_t>(out.get(), n_out);
}

// Compares the listed tokens (all when `which` is empty) with the CPU reference.
void expect_matches(const Cache &c, const std::vector<Tok> &toks, const std::vector<float> &q,
                    const std::vector<bf16_t> &got, const char *what, std::vector<int32_t> which = {}) {
    const Shape s = c.shape();
    const size_t row = static_cast<size_t>(s.H) * s.hd;
    if (which.empty()) {
        which.resize(toks.size());
        std::iota(which.begin(), which.end(), 0);
    }
    double worst = 0;
    for (int32_t i : which) {
        const auto ref = c.reference(toks[i], q.data() + i * row);
        const std::vector<float> g = to_f32(std::vector<bf16_t>(got.begin() + i * row, got.begin() + (i + 1) * row));
        const double err = rel_max_err(g, ref);
        worst = std::max(worst, err);
        EXPECT_LT(err, 1e-2) << what << ": token " << i << " (pos " << toks[i].pos << ")";
    }
    std::printf("decode attention %s H=%d KV=%d hd=%d tokens=%zu: worst max rel err %.2e\n", what, s.H, s.KV, s.hd,
                which.size(), worst);
}

int32_t max_len(const std::vector<Tok> &toks) {
    int32_t m = 0;
    for (const Tok &t : toks) m = std::max(m, t.pos + 1);
    return m;
}

class DecodeContext : public ::testing::TestWithParam<int32_t> {};

TEST_P(DecodeContext, DbrxShapeMatchesCpu) {
    const int32_t ctx = GetParam();
    Cache c(kDbrx, {ctx}, 100 + ctx);
    const std::vector<Tok> toks{{0, ctx - 1}};
    const auto q = queries(kDbrx, 1, 7);
    expect_matches(c, toks, q, run(c, toks, q, ctx), ("ctx " + std::to_string(ctx)).c_str());
}

INSTANTIATE_TEST_SUITE_P(Contexts, DecodeContext, ::testing::Values(1, 15, 16, 17, 1000, 8192, 32768));

TEST(CudaDecodeAttention, Batch64MixedContexts) {
    std::vector<int32_t> lens{1, 16, 17, 256, 257, 4096, 4097, 6000};
    std::mt19937 rng(3);
    while (lens.size() < 64) lens.push_back(1 + static_cast<int32_t>(rng() % 3000));
    Cache c(kDbrx, lens, 21);
    std::vector<Tok> toks;
    for (size_t s = 0; s < lens.size(); ++s) toks.push_back({static_cast<int32_t>(s), lens[s] - 1});
    const auto q = queries(kDbrx, toks.size(), 22);
    expect_matches(c, toks, q, run(c, toks, q, max_len(toks)), "batch 64");
}

// Short prefill chunks: consecutive positions of one sequence in one launch, each causal to its own
// position (a chunk crossing the 4096-key split regime too), then the same launch through tok_list.
TEST(CudaDecodeAttention, ShortPrefillChunksAndTokList) {
    Cache c(kDbrx, {5, 115, 4100, 600}, 31);
    std::vector<Tok> toks;
    for (int32_t p = 0; p < 5; ++p) toks.push_back({0, p});
    for (int32_t p = 100; p < 115; ++p) toks.push_back({1, p});
    for (int32_t p = 4090; p < 4100; ++p) toks.push_back({2, p});
    toks.push_back({3, 599});
    const auto q = queries(kDbrx, toks.size(), 32);
    const auto all = run(c, toks, q, 4100);
    expect_matches(c, toks, q, all, "prefill chunks");

    std::vector<int32_t> list;
    for (int32_t i = 1; i < static_cast<int32_t>(toks.size()); i += 3) list.push_back(i);
    const auto listed = run(c, toks, q, 4100, list);
    const size_t row = static_cast<size_t>(kDbrx.H) * kDbrx.hd;
    for (size_t i = 0; i < toks.size(); ++i) {
        const bool in = std::find(list.begin(), list.end(), static_cast<int32_t>(i)) != list.end();
        const bool same = std::memcmp(listed.data() + i * row, all.data() + i * row, row * sizeof(bf16_t)) == 0;
        const bool untouched = std::all_of(listed.begin() + i * row, listed.begin() + (i + 1) * row,
                                           [](bf16_t v) { return v == 0xffff; });
        EXPECT_TRUE(in ? same : untouched) << "token " << i << (in ? " listed: differs" : " unlisted: written");
    }
}

// Fixture shapes (tiny-dbrx hd 128 and tiny-dbrx-cl100k hd 16, both 2 heads over 1 KV head), other
// group sizes on the tensor cores (1, 3, 16) and shapes that take the generic kernel (hd 96, 256).
TEST(CudaDecodeAttention, OtherShapes) {
    const Shape shapes[] = {{2, 1, 128}, {2, 1, 16}, {8, 8, 64}, {12, 4, 32}, {32, 2, 128}, {8, 2, 96}, {4, 2, 256}};
    uint32_t seed = 40;
    for (const Shape &s : shapes) {
        Cache c(s, {1, 70, 300, 5000, 20}, ++seed);
        std::vector<Tok> toks{{0, 0}, {1, 69}, {2, 299}, {3, 4999}};
        for (int32_t p = 10; p < 20; ++p) toks.push_back({4, p});
        const auto q = queries(s, toks.size(), ++seed);
        const std::string what = "shape hd " + std::to_string(s.hd) + " G " + std::to_string(s.H / s.KV);
        expect_matches(c, toks, q, run(c, toks, q, 5000), what.c_str());
    }
}

// A token's output bytes are the same alone (max_ctx = its context) and among 23 other tokens with
// a larger max_ctx, with and without tok_list, on the tensor-core and the generic kernel.
TEST(CudaDecodeAttention, BatchInvariantBitwise) {
    for (const Shape &s : {kDbrx, Shape{8, 2, 96}}) {
        std::vector<int32_t> lens{9000, 777, 1, 4096, 4097};
        std::mt19937 rng(5);
        while (lens.size() < 24) lens.push_back(1 + static_cast<int32_t>(rng() % 3000));
        Cache c(s, lens, 51);
        std::vector<Tok> toks;
        for (size_t i = 0; i < lens.size(); ++i) toks.push_back({static_cast<int32_t>(i), lens[i] - 1});
        const auto q = queries(s, toks.size(), 52);
        const size_t row = static_cast<size_t>(s.H) * s.hd;
        const auto batch = run(c, toks, q, 32768);
        std::vector<int32_t> list{3, 0, 1, 4, 2, 17};
        const auto listed = run(c, toks, q, 20000, list);
        for (int32_t i = 0; i < 5; ++i) {
            const std::vector<float> qi(q.begin() + i * row, q.begin() + (i + 1) * row);
            const auto alone = run(c, {toks[i]}, qi, lens[i]);
            EXPECT_EQ(std::memcmp(alone.data(), batch.data() + i * row, row * sizeof(bf16_t)), 0)
                << "hd " << s.hd << ": token of context " << lens[i] << " alone vs in the batch";
            EXPECT_EQ(std::memcmp(alone.data(), listed.data() + i * row, row * sizeof(bf16_t)), 0)
                << "hd " << s.hd << ": token of context " << lens[i] << " alone vs listed";
        }
        expect_matches(c, toks, q, batch, "invariance batch", {0, 1, 2, 3, 4});
    }
}

}  // namespace
}  // namespace dbrx::cuda::test
