// Paged decode attention (attention(): the tensor-core kernel and the generic one) against
// cpu::attend_one on random bf16 caches: the DBRX shape from 1 to 32768 keys, a batch of 64 mixed
// contexts, short prefill chunks, tok_list, the fixtures' and other group sizes, bitwise batch
// invariance (a token's output bytes do not depend on the rest of the launch or on max_ctx), and the
// fused merge's self-resetting counters (repeated launches on one scratch, CUDA graph replays,
// launches that take more than one counter bank's worth of tokens). The cases run with the cache in
// each KV layout (head-major, slot-major); both layouts give the same output bytes.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <numeric>
#include <span>
#include <tuple>

#include "backend/cpu/kernels.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "kv_layout_test_util.h"

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

// A paged cache in `layout` of sequences with lens[s] positions each, blocks shuffled across the
// pool; the slots past a sequence's end hold NaN, so a kernel that read them would show it in its
// output. The keys and values do not depend on the layout; the CPU reference reads a slot-major copy.
class Cache {
public:
    Cache(Shape s, std::vector<int32_t> lens, uint32_t seed, KvLayout layout = KvLayout::HeadMajor)
        : shape_(s), layout_(layout), lens_(std::move(lens)) {
        int32_t n_blocks = 0;
        for (int32_t len : lens_) {
            block_off_.push_back(n_blocks);
            n_blocks += (len + kBs - 1) / kBs;
        }
        blocks_.resize(n_blocks);
        std::iota(blocks_.begin(), blocks_.end(), 0);
        std::shuffle(blocks_.begin(), blocks_.end(), std::mt19937(seed));
        const KvLayer kv = kv_shape(kBs, s.KV, s.hd, layout);
        std::vector<bf16_t> data(static_cast<size_t>(n_blocks * kv.block_stride), float_to_bf16(NAN));
        Rng rng{seed};
        for (size_t q = 0; q < lens_.size(); ++q)
            for (int32_t p = 0; p < lens_[q]; ++p)
                for (int32_t h = 0; h < s.KV; ++h) {
                    const int64_t off = kv_offset(kv, blocks_[block_off_[q] + p / kBs], p % kBs, h);
                    for (int32_t i = 0; i < s.hd; ++i) {
                        data[off + i] = float_to_bf16(rng.next());
                        data[off + kv.v_offset + i] = float_to_bf16(rng.next());
                    }
                }
        host_ = to_f32(slot_major(data, n_blocks, kv));
        dev_ = to_device(data);
        d_boff_ = to_device(block_off_);
        d_blocks_ = to_device(blocks_);
    }
    int64_t half() const { return int64_t{kBs} * shape_.KV * shape_.hd; }
    Shape shape() const { return shape_; }
    KvLayout layout() const { return layout_; }
    KvLayer layer() const { return kv_layer(dev_.as<bf16_t>(), kBs, shape_.KV, shape_.hd, layout_); }
    const int32_t *d_boff() const { return d_boff_.as<int32_t>(); }
    const int32_t *d_blocks() const { return d_blocks_.as<int32_t>(); }

    // cpu::attend_one for every head of one token (host_ is slot-major, as cpu::PagedKv reads).
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
    KvLayout layout_;
    std::vector<int32_t> lens_, block_off_, blocks_;
    std::vector<float> host_;
    DeviceBuffer dev_, d_boff_, d_blocks_;
};

std::vector<float> queries(const Shape &s, size_t n_tokens, uint32_t seed) {
    // Wider than the keys: softmaxes from flat to peaked.
    return uniform(n_tokens * s.H * s.hd, -3.f, 3.f, seed);
}

// The device inputs of attention() over `toks` (optionally restricted to tok_list) with the grid
// bound from max_ctx, launchable any number of times on a given stream and scratch.
class Launch {
public:
    Launch(const Cache &c, const std::vector<Tok> &toks, const std::vector<float> &q, int32_t max_ctx,
           const std::vector<int32_t> &tok_list = {}, bool invariant = true)
        : c_(c), max_ctx_(max_ctx), n_out_(toks.size() * c.shape().H * c.shape().hd), invariant_(invariant) {
        std::vector<int32_t> pos, seq;
        for (const Tok &t : toks) {
            pos.push_back(t.pos);
            seq.push_back(t.seq);
        }
        d_pos_ = to_device(pos);
        d_seq_ = to_device(seq);
        d_q_ = to_device(q);
        d_list_ = to_device(tok_list);
        listed_ = !tok_list.empty();
        n_ = listed_ ? static_cast<int32_t>(tok_list.size()) : static_cast<int32_t>(toks.size());
        splits_ = attention_splits(n_, c.shape().KV, max_ctx);
        out_ = DeviceBuffer(sizeof(bf16_t) * n_out_);
    }
    size_t scratch_bytes() const {
        return std::max<size_t>(1, attention_scratch_bytes(n_, c_.shape().H, c_.shape().hd, splits_));
    }
    // Fills the output with 0xFFFF (NaN), then (with `launch`) enqueues attention() on `stream`.
    void enqueue(void *scratch, cudaStream_t stream, bool fill = true, bool launch = true) const {
        if (fill) DBRX_CUDA_CHECK(cudaMemsetAsync(out_.get(), 0xff, out_.bytes(), stream));
        if (!launch) return;
        const TokenMeta tm{d_pos_.as<int32_t>(), d_seq_.as<int32_t>(), c_.d_boff(), c_.d_blocks()};
        attention(d_q_.as<float>(), n_, c_.shape().H, tm, c_.layer(), max_ctx_, splits_, scratch, out_.as<bf16_t>(),
                  stream, listed_ ? d_list_.as<int32_t>() : nullptr, invariant_);
    }
    std::vector<bf16_t> output() const { return to_host<bf16_t>(out_.get(), n_out_); }

private:
    const Cache &c_;
    int32_t max_ctx_, n_ = 0, splits_ = 1;
    size_t n_out_;
    bool listed_ = false, invariant_;
    DeviceBuffer d_pos_, d_seq_, d_q_, d_list_, out_;
};

// One attention() launch on a fresh scratch; returns the whole output, whose unlisted tokens keep
// the 0xFFFF (NaN) fill.
std::vector<bf16_t> run(const Cache &c, const std::vector<Tok> &toks, const std::vector<float> &q, int32_t max_ctx,
                        const std::vector<int32_t> &tok_list = {}, bool invariant = true) {
    const Launch l(c, toks, q, max_ctx, tok_list, invariant);
    DeviceBuffer scratch(l.scratch_bytes());
    l.enqueue(scratch.get(), nullptr);
    return l.output();
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
        EXPECT_LT(err, 1e-2) << what << ", " << kv_layout_name(c.layout()) << " KV: token " << i << " (pos "
                             << toks[i].pos << ")";
    }
    std::printf("decode attention %s H=%d KV=%d hd=%d %s KV tokens=%zu: worst max rel err %.2e\n", what, s.H, s.KV,
                s.hd, kv_layout_name(c.layout()), which.size(), worst);
}

int32_t max_len(const std::vector<Tok> &toks) {
    int32_t m = 0;
    for (const Tok &t : toks) m = std::max(m, t.pos + 1);
    return m;
}

// Context lengths by the KV layout of the cache.
class DecodeContext : public ::testing::TestWithParam<std::tuple<int32_t, KvLayout>> {};

TEST_P(DecodeContext, DbrxShapeMatchesCpu) {
    const auto [ctx, layout] = GetParam();
    Cache c(kDbrx, {ctx}, 100 + ctx, layout);
    const std::vector<Tok> toks{{0, ctx - 1}};
    const auto q = queries(kDbrx, 1, 7);
    expect_matches(c, toks, q, run(c, toks, q, ctx), ("ctx " + std::to_string(ctx)).c_str());
}

INSTANTIATE_TEST_SUITE_P(Contexts, DecodeContext,
                         ::testing::Combine(::testing::Values(1, 15, 16, 17, 1000, 8192, 32768),
                                            ::testing::ValuesIn(kKvLayouts)),
                         [](const ::testing::TestParamInfo<DecodeContext::ParamType> &info) {
                             return "ctx" + std::to_string(std::get<0>(info.param)) +
                                    (std::get<1>(info.param) == KvLayout::HeadMajor ? "HeadMajor" : "SlotMajor");
                         });

// 64 sequences: `lens` first, then random lengths in [lo, lo + span); returns them, and in `toks` the
// last position of each.
std::vector<int32_t> batch64(std::vector<int32_t> lens, uint32_t seed, int32_t lo, int32_t span,
                             std::vector<Tok> &toks) {
    std::mt19937 rng(seed);
    while (lens.size() < 64) lens.push_back(lo + static_cast<int32_t>(rng() % span));
    for (size_t s = 0; s < lens.size(); ++s) toks.push_back({static_cast<int32_t>(s), lens[s] - 1});
    return lens;
}

// Both modes of attention(): batch-invariant, and outside it, where a launch this large (64 tokens x
// 8 KV heads x a grid bound of 16 splits: 8192 CTAs, over 4 waves of 2 per SM on any GPU up to 512
// SMs) takes splits at least twice as long: the CPU's result either way, through the longer splits'
// ranges, remainders and merges.
TEST(CudaDecodeAttention, Batch64MixedContexts) {
    std::vector<Tok> toks;
    const auto lens = batch64({1, 16, 17, 256, 257, 1025, 4096, 4097, 6000}, 3, 1, 6000, toks);
    const auto q = queries(kDbrx, toks.size(), 22);
    for (KvLayout layout : kKvLayouts) {
        Cache c(kDbrx, lens, 21, layout);
        const auto invariant = run(c, toks, q, max_len(toks)), fast = run(c, toks, q, max_len(toks), {}, false);
        expect_matches(c, toks, q, invariant, "batch 64");
        expect_matches(c, toks, q, fast, "batch 64, not batch-invariant");
        EXPECT_NE(fast, invariant) << "the launch outside batch-invariant mode did not lengthen its splits";
    }
}

// Short prefill chunks: consecutive positions of one sequence in one launch, each causal to its own
// position (a chunk crossing the 4096-key split regime too), then the same launch through tok_list.
void short_chunks_and_tok_list(KvLayout layout) {
    Cache c(kDbrx, {5, 115, 4100, 600}, 31, layout);
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
        EXPECT_TRUE(in ? same : untouched) << kv_layout_name(layout) << " KV: token " << i
                                           << (in ? " listed: differs" : " unlisted: written");
    }
}
TEST(CudaDecodeAttention, ShortPrefillChunksAndTokList) {
    for (KvLayout layout : kKvLayouts) short_chunks_and_tok_list(layout);
}

// Fixture shapes (tiny-dbrx hd 128 and tiny-dbrx-cl100k hd 16, both 2 heads over 1 KV head), other
// group sizes on the tensor cores (1, 3, 16) and shapes that take the generic kernel (hd 96, 256).
TEST(CudaDecodeAttention, OtherShapes) {
    const Shape shapes[] = {{2, 1, 128}, {2, 1, 16}, {8, 8, 64}, {12, 4, 32}, {32, 2, 128}, {8, 2, 96}, {4, 2, 256}};
    uint32_t seed = 40;
    for (const Shape &s : shapes) {
        const uint32_t cache_seed = ++seed;
        std::vector<Tok> toks{{0, 0}, {1, 69}, {2, 299}, {3, 4999}};
        for (int32_t p = 10; p < 20; ++p) toks.push_back({4, p});
        const auto q = queries(s, toks.size(), ++seed);
        const std::string what = "shape hd " + std::to_string(s.hd) + " G " + std::to_string(s.H / s.KV);
        for (KvLayout layout : kKvLayouts) {
            Cache c(s, {1, 70, 300, 5000, 20}, cache_seed, layout);
            expect_matches(c, toks, q, run(c, toks, q, 5000), what.c_str());
        }
    }
}

// A token's output bytes are the same alone (max_ctx = its context) and among 23 other tokens with
// a larger max_ctx, with and without tok_list, on the tensor-core and the generic kernel (on an
// H200's tensor cores the 24-token launch takes 4 splits per CTA, the others one).
// The KV layout moves the keys, not the arithmetic: both layouts' outputs are the same bytes.
TEST(CudaDecodeAttention, BatchInvariantBitwise) {
    for (const Shape &s : {kDbrx, Shape{8, 2, 96}}) {
        std::vector<int32_t> lens{9000, 777, 1, 4096, 4097};
        std::mt19937 rng(5);
        while (lens.size() < 24) lens.push_back(1 + static_cast<int32_t>(rng() % 3000));
        std::vector<Tok> toks;
        for (size_t i = 0; i < lens.size(); ++i) toks.push_back({static_cast<int32_t>(i), lens[i] - 1});
        const auto q = queries(s, toks.size(), 52);
        const size_t row = static_cast<size_t>(s.H) * s.hd;
        std::vector<std::vector<bf16_t>> by_layout;
        for (KvLayout layout : kKvLayouts) {
            const char *name = kv_layout_name(layout);
            Cache c(s, lens, 51, layout);
            const auto batch = run(c, toks, q, 32768);
            std::vector<int32_t> list{3, 0, 1, 4, 2, 17};
            const auto listed = run(c, toks, q, 20000, list);
            for (int32_t i = 0; i < 5; ++i) {
                const std::vector<float> qi(q.begin() + i * row, q.begin() + (i + 1) * row);
                const auto alone = run(c, {toks[i]}, qi, lens[i]);
                EXPECT_EQ(std::memcmp(alone.data(), batch.data() + i * row, row * sizeof(bf16_t)), 0)
                    << "hd " << s.hd << ", " << name << " KV: token of context " << lens[i] << " alone vs in the batch";
                EXPECT_EQ(std::memcmp(alone.data(), listed.data() + i * row, row * sizeof(bf16_t)), 0)
                    << "hd " << s.hd << ", " << name << " KV: token of context " << lens[i] << " alone vs listed";
            }
            expect_matches(c, toks, q, batch, "invariance batch", {0, 1, 2, 3, 4});
            by_layout.push_back(batch);
        }
        EXPECT_TRUE(by_layout[0] == by_layout[1]) << "hd " << s.hd << ": the two KV layouts give different outputs";
    }
}

// The fused merge's arrival counters must be back to zero after every launch: the same launches,
// repeated on one scratch with other shapes in between, eagerly and as replays of a captured CUDA
// graph, give the same bytes each time.
TEST(CudaDecodeAttention, RepeatedLaunchesAndGraphReplay) {
    std::vector<int32_t> lens{32768, 9000, 4097, 300, 1};
    Cache c(kDbrx, lens, 61);
    std::vector<Tok> toks;
    for (size_t i = 0; i < lens.size(); ++i) toks.push_back({static_cast<int32_t>(i), lens[i] - 1});
    const auto q = queries(kDbrx, toks.size(), 62);
    const Launch big(c, toks, q, 32768);
    const std::vector<Tok> few{toks[1], toks[3]};
    const std::vector<float> q_few = queries(kDbrx, few.size(), 63);
    const Launch small(c, few, q_few, 9000);
    DeviceBuffer scratch(std::max(big.scratch_bytes(), small.scratch_bytes()));
    Stream stream;

    big.enqueue(scratch.get(), stream.get());
    const auto first = big.output();
    expect_matches(c, toks, q, first, "repeated launches");
    small.enqueue(scratch.get(), stream.get());
    const auto small_first = small.output();
    for (int rep = 0; rep < 3; ++rep) {
        big.enqueue(scratch.get(), stream.get());
        EXPECT_TRUE(big.output() == first) << "eager launch " << rep << " differs from the first";
        small.enqueue(scratch.get(), stream.get());
        EXPECT_TRUE(small.output() == small_first) << "eager small launch " << rep << " differs from the first";
    }

    cudaGraph_t graph = nullptr;
    // The graph holds the attention launch alone, as the backend's graphs hold it after a kernel.
    DBRX_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
    big.enqueue(scratch.get(), stream.get(), false);
    DBRX_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
    cudaGraphExec_t exec = nullptr;
    DBRX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int rep = 0; rep < 3; ++rep) {
        big.enqueue(scratch.get(), stream.get(), true, false);
        DBRX_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
        EXPECT_TRUE(big.output() == first) << "graph replay " << rep << " differs from the eager launch";
        small.enqueue(scratch.get(), stream.get());  // a different launch between the replays
        EXPECT_TRUE(small.output() == small_first) << "small launch after replay " << rep << " differs";
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
}

// 9000 tokens with 8 KV heads take two slices of one counter bank (8192 tokens each): the tokens of
// the second slice equal those of the first with the same context and queries, bitwise.
TEST(CudaDecodeAttention, LaunchBeyondOneCounterBank) {
    constexpr int32_t kLen = 600, kTokens = 9000;
    Cache c(kDbrx, {kLen}, 71);
    const auto q_pos = queries(kDbrx, kLen, 72);
    const size_t row = static_cast<size_t>(kDbrx.H) * kDbrx.hd;
    std::vector<Tok> toks;
    std::vector<float> q;
    for (int32_t i = 0; i < kTokens; ++i) {
        const int32_t p = kLen - 1 - i % kLen;
        toks.push_back({0, p});
        q.insert(q.end(), q_pos.begin() + p * row, q_pos.begin() + (p + 1) * row);
    }
    const auto got = run(c, toks, q, kLen);
    int32_t differing = 0;
    for (int32_t i = kLen; i < kTokens; ++i)
        differing += std::memcmp(got.data() + i * row, got.data() + (i % kLen) * row, row * sizeof(bf16_t)) != 0;
    EXPECT_EQ(differing, 0) << "tokens differing from the same position's token in the first " << kLen;
    expect_matches(c, toks, q, got, "9000 tokens", {0, 1, 300, 599, 8191, 8192, 8500, 8999});
}

}  // namespace
}  // namespace dbrx::cuda::test
