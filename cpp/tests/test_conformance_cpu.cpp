// The CPU backend against the float64 reference fixtures: last-position logits, greedy decoding
// through the paged KV cache, every-prefix logits (tiny-dbrx), and the determinism contract
// (bitwise identical logits across chunking, batching, block placement and thread count).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "backend_seq.h"
#include "model/backend.h"
#include "reference_fixture.h"

namespace dbrx {
namespace {

constexpr int32_t kBlockSize = 16;
constexpr float kLogitTolerance = 2e-3f;
constexpr double kMarginFloor = 1e-2;

using dbrx::testing::RefCase;
using Fixture = dbrx::testing::ReferenceFixture;

using dbrx::testing::prefill;
using dbrx::testing::Seq;
using dbrx::testing::sequential_blocks;

float max_diff(const float *a, const float *b, int32_t n) {
    float m = 0;
    for (int32_t i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
}

int32_t argmax(const std::vector<float> &v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class CpuConformance : public ::testing::TestWithParam<const char *> {
protected:
    std::string dir() const { return std::string(DBRX_SOURCE_DIR) + "/" + GetParam(); }
};

TEST_P(CpuConformance, LastLogitsAndGreedyDecodeMatchReference) {
    Fixture fx(dir());
    auto backend = make_cpu_backend(*fx.ckpt, BackendOptions{});
    float worst = 0;
    for (size_t c = 0; c < fx.cases.size(); ++c) {
        const RefCase &rc = fx.cases[c];
        const int32_t total = static_cast<int32_t>(rc.prompt.size() + rc.greedy.size());
        const int32_t n_blocks = (total + kBlockSize - 1) / kBlockSize;
        auto pool = backend->create_kv_pool(n_blocks, kBlockSize);
        Seq seq{sequential_blocks(0, n_blocks)};
        auto logits = prefill(*backend, *pool, seq, rc.prompt, 0, fx.vocab());
        auto ref = fx.tensor("case" + std::to_string(c) + ".last_logits");
        ASSERT_EQ(ref.size(), size_t(fx.vocab()));
        float diff = max_diff(logits.data(), ref.data(), fx.vocab());
        worst = std::max(worst, diff);
        EXPECT_LE(diff, kLogitTolerance) << "case " << c;
        size_t checked = 0;
        for (size_t i = 0; i < rc.greedy.size() && rc.margins[i] >= kMarginFloor; ++i, ++checked) {
            ASSERT_EQ(argmax(logits), rc.greedy[i]) << "case " << c << " greedy step " << i;
            logits = prefill(*backend, *pool, seq, {rc.greedy[i]}, 0, fx.vocab());
        }
        std::printf("[ %s ] case %zu: prompt %zu tokens, last-logit max |diff| %.3g, %zu/%zu greedy ids checked\n",
                    GetParam(), c, rc.prompt.size(), diff, checked, rc.greedy.size());
    }
    std::printf("[ %s ] worst last-logit max |diff| %.3g\n", GetParam(), worst);
}

TEST_P(CpuConformance, LogitsAreBitwiseDeterministic) {
    Fixture fx(dir());
    // The longest prompt, plus another case to share the batch with.
    size_t main = 0;
    for (size_t c = 0; c < fx.cases.size(); ++c)
        if (fx.cases[c].prompt.size() > fx.cases[main].prompt.size()) main = c;
    const std::vector<int32_t> &prompt = fx.cases[main].prompt;
    const std::vector<int32_t> &other = fx.cases[(main + 1) % fx.cases.size()].prompt;
    const int32_t vocab = fx.vocab();
    const int32_t need = static_cast<int32_t>((prompt.size() + kBlockSize - 1) / kBlockSize);
    const int32_t n_blocks = 4 * need + 8;

    BackendOptions two;
    two.n_threads = 2;
    BackendOptions one;
    one.n_threads = 1;
    auto backend = make_cpu_backend(*fx.ckpt, two);
    auto single = make_cpu_backend(*fx.ckpt, one);
    auto pool = backend->create_kv_pool(n_blocks, kBlockSize);

    Seq base_seq{sequential_blocks(0, need)};
    const auto base = prefill(*backend, *pool, base_seq, prompt, 0, vocab);

    Seq chunk_seq{sequential_blocks(0, need)};
    EXPECT_TRUE(same_bits(base, prefill(*backend, *pool, chunk_seq, prompt, 7, vocab))) << "chunks of 7";
    Seq token_seq{sequential_blocks(0, need)};
    EXPECT_TRUE(same_bits(base, prefill(*backend, *pool, token_seq, prompt, 1, vocab))) << "token by token";
    Seq thread_seq{sequential_blocks(0, need)};
    EXPECT_TRUE(same_bits(base, prefill(*single, *pool, thread_seq, prompt, 0, vocab))) << "1 vs 2 threads";

    std::vector<int32_t> shuffled = sequential_blocks(0, n_blocks);
    std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(42));
    Seq shuffled_seq{std::vector<int32_t>(shuffled.begin(), shuffled.begin() + need)};
    EXPECT_TRUE(same_bits(base, prefill(*backend, *pool, shuffled_seq, prompt, 0, vocab))) << "shuffled blocks";

    // Inside a batch: the other prompt goes first (its own blocks); both want logits.
    const int32_t other_need = static_cast<int32_t>((other.size() + kBlockSize - 1) / kBlockSize);
    std::vector<int32_t> other_blocks = sequential_blocks(need, other_need);
    std::vector<int32_t> main_blocks = sequential_blocks(need + other_need, need);
    SeqStep steps[2] = {{other, 0, other_blocks, true}, {prompt, 0, main_blocks, true}};
    std::vector<float> both(2 * static_cast<size_t>(vocab));
    backend->forward(*pool, steps, both.data());
    EXPECT_TRUE(same_bits(base, std::vector<float>(both.begin() + vocab, both.end()))) << "batched with another";
    Seq other_seq{sequential_blocks(0, other_need)};
    EXPECT_TRUE(same_bits(prefill(*backend, *pool, other_seq, other, 0, vocab),
                          std::vector<float>(both.begin(), both.begin() + vocab)))
        << "the other sequence of the batch";

    // A decode step batched with another sequence's prefill chunk gives the same bits as alone.
    const int32_t next = argmax(base);
    Seq solo{sequential_blocks(0, need + 1)};
    prefill(*backend, *pool, solo, prompt, 0, vocab);
    const auto solo_next = prefill(*backend, *pool, solo, {next}, 0, vocab);
    std::vector<int32_t> main_blocks2 = sequential_blocks(need + other_need, need + 1);
    SeqStep mixed[2] = {{other, 0, other_blocks, false},
                        {std::span<const int32_t>(&next, 1), static_cast<int32_t>(prompt.size()), main_blocks2, true}};
    std::vector<float> mixed_logits(vocab);
    backend->forward(*pool, mixed, mixed_logits.data());
    EXPECT_TRUE(same_bits(solo_next, mixed_logits)) << "decode batched with a prefill";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CpuConformance, ::testing::Values("fixtures/tiny-dbrx", "models/tiny-dbrx-cl100k"),
                         [](const auto &info) {
                             std::string s = info.param;
                             return s.find("cl100k") != std::string::npos ? std::string("TinyDbrxCl100k")
                                                                           : std::string("TinyDbrx");
                         });

// tiny-dbrx stores every position's reference logits: run a prompt token by token and compare each prefix.
TEST(CpuConformanceTiny, EveryPrefixMatchesReference) {
    Fixture fx(std::string(DBRX_SOURCE_DIR) + "/fixtures/tiny-dbrx");
    auto backend = make_cpu_backend(*fx.ckpt, BackendOptions{});
    const size_t c = 2;  // 37 tokens: spans three blocks of 16
    const auto &prompt = fx.cases.at(c).prompt;
    const auto all = fx.tensor("case" + std::to_string(c) + ".logits");
    const int32_t vocab = fx.vocab();
    ASSERT_EQ(all.size(), prompt.size() * vocab);
    const int32_t need = static_cast<int32_t>((prompt.size() + kBlockSize - 1) / kBlockSize);
    auto pool = backend->create_kv_pool(need, kBlockSize);
    Seq seq{sequential_blocks(0, need)};
    float worst = 0;
    for (size_t i = 0; i < prompt.size(); ++i) {
        auto logits = prefill(*backend, *pool, seq, {prompt[i]}, 0, vocab);
        float diff = max_diff(logits.data(), all.data() + i * vocab, vocab);
        worst = std::max(worst, diff);
        EXPECT_LE(diff, kLogitTolerance) << "position " << i;
    }
    std::printf("[ tiny-dbrx ] case %zu every-prefix max |diff| %.3g over %zu positions\n", c, worst, prompt.size());
}

}  // namespace
}  // namespace dbrx
