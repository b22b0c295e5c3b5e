// Each CPU kernel against a straightforward double-precision loop, plus the bitwise properties the
// determinism contract needs (results independent of token count, thread count and block placement).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "backend/cpu/kernels.h"
#include "util/thread_pool.h"

namespace dbrx::cpu {
namespace {

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (auto &x : v) x = dist(rng);
    return v;
}

std::vector<bf16_t> random_bf16(size_t n, uint32_t seed, float scale = 1.0f) {
    std::vector<bf16_t> v(n);
    auto f = random_floats(n, seed, scale);
    for (size_t i = 0; i < n; ++i) v[i] = float_to_bf16(f[i]);
    return v;
}

double bf(bf16_t b) { return bf16_to_float(b); }

float max_abs_diff(const std::vector<float> &a, const std::vector<double> &b) {
    EXPECT_EQ(a.size(), b.size());
    double m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return static_cast<float>(m);
}

TEST(CpuThreadPool, CoversEveryIndexOnceAndRethrows) {
    for (int32_t threads : {1, 2, 5}) {
        ThreadPool pool(threads);
        EXPECT_EQ(pool.size(), threads);
        for (int64_t n : {0, 1, 3, 1000}) {
            std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
            pool.parallel_for(n, [&](int64_t b, int64_t e) {
                for (int64_t i = b; i < e; ++i) hits[i]++;
            });
            for (auto &h : hits) EXPECT_EQ(h.load(), 1);
        }
        EXPECT_THROW(pool.parallel_for(100, [](int64_t, int64_t) { throw std::runtime_error("slice failed"); }),
                     std::runtime_error);
        // Still usable after an exception.
        std::atomic<int64_t> sum{0};
        pool.parallel_for(10, [&](int64_t b, int64_t e) { for (int64_t i = b; i < e; ++i) sum += i; });
        EXPECT_EQ(sum.load(), 45);
    }
    EXPECT_GE(ThreadPool(0).size(), 1);
}

TEST(CpuKernels, DotMatchesDouble) {
    for (int64_t n : {0, 1, 15, 16, 17, 128, 1000}) {
        auto a = random_floats(n, 1), b = random_floats(n, 2);
        double ref = 0;
        for (int64_t i = 0; i < n; ++i) ref += double(a[i]) * b[i];
        EXPECT_NEAR(dot(a.data(), b.data(), n), ref, 1e-5 * std::sqrt(double(n) + 1)) << n;
    }
}

// The exact order documented in kernels.h (8 lanes, pairwise combination, tail), emulated in scalar
// fp32: whichever clone (SSE2 or AVX2) runs here must give these bits, which other backends can mirror.
TEST(CpuKernels, DotFollowsTheDocumentedOrderBitwise) {
    for (int64_t n : {0, 5, 8, 64, 131, 256}) {
        auto a = random_floats(n, 20), b = random_floats(n, 21);
        float lanes[8] = {};
        int64_t whole = n - n % 8;
        for (int64_t i = 0; i < whole; ++i) lanes[i % 8] += a[i] * b[i];
        for (int width = 4; width >= 1; width /= 2)
            for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
        float expect = lanes[0];
        for (int64_t i = whole; i < n; ++i) expect += a[i] * b[i];
        float got = dot(a.data(), b.data(), n);
        EXPECT_EQ(0, std::memcmp(&got, &expect, sizeof got)) << n << ": " << got << " vs " << expect;
    }
}

TEST(CpuKernels, LayerNormMatchesDouble) {
    ThreadPool pool(2);
    const int64_t t = 3, d = 37;
    auto x = random_floats(t * d, 3, 2.0f);
    for (auto &v : x) v += 5.0f;  // a large mean exercises the centred variance
    auto w = random_bf16(d, 4);
    std::vector<float> y(t * d);
    layernorm(x.data(), w.data(), y.data(), t, d, pool);
    std::vector<double> ref(t * d);
    for (int64_t r = 0; r < t; ++r) {
        double mu = 0, var = 0;
        for (int64_t i = 0; i < d; ++i) mu += x[r * d + i];
        mu /= d;
        for (int64_t i = 0; i < d; ++i) var += (x[r * d + i] - mu) * (x[r * d + i] - mu);
        var /= d;
        for (int64_t i = 0; i < d; ++i) ref[r * d + i] = (x[r * d + i] - mu) / std::sqrt(var + 1e-5) * bf(w[i]);
    }
    EXPECT_LT(max_abs_diff(y, ref), 1e-5);
    layernorm(x.data(), w.data(), x.data(), t, d, pool);  // in place
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), y.size() * sizeof(float)));
}

TEST(CpuKernels, GemmXWtMatchesDoubleAndIsPerTokenBitwise) {
    const int64_t t = 7, k = 45, n = 133;  // 3 threads split the rows 45/44/44: tiles straddle
    auto x = random_floats(t * k, 5);
    auto w = random_bf16(n * k, 6, 0.1f);
    ThreadPool one(1), three(3);
    std::vector<float> y(t * n), y3(t * n), y_single(n);
    gemm_xwt(x.data(), t, k, w.data(), n, y.data(), one);
    std::vector<double> ref(t * n);
    for (int64_t a = 0; a < t; ++a)
        for (int64_t b = 0; b < n; ++b) {
            double s = 0;
            for (int64_t j = 0; j < k; ++j) s += double(x[a * k + j]) * bf(w[b * k + j]);
            ref[a * n + b] = s;
        }
    EXPECT_LT(max_abs_diff(y, ref), 1e-5);
    gemm_xwt(x.data(), t, k, w.data(), n, y3.data(), three);
    EXPECT_EQ(0, std::memcmp(y.data(), y3.data(), y.size() * sizeof(float)));
    gemm_xwt(x.data() + 4 * k, 1, k, w.data(), n, y_single.data(), three);  // token 4 alone
    EXPECT_EQ(0, std::memcmp(y.data() + 4 * n, y_single.data(), n * sizeof(float)));
}

TEST(CpuKernels, GemmXWMatchesDoubleAndIsPerTokenBitwise) {
    const int64_t t = 5, k = 40, n = 70;  // W is [k, n]
    auto x = random_floats(t * k, 7);
    auto w = random_bf16(k * n, 8, 0.1f);
    ThreadPool one(1), two(2);
    std::vector<float> y(t * n), y2(t * n), y_single(n);
    gemm_xw(x.data(), t, k, w.data(), n, y.data(), one);
    std::vector<double> ref(t * n, 0.0);
    for (int64_t a = 0; a < t; ++a)
        for (int64_t j = 0; j < k; ++j)
            for (int64_t b = 0; b < n; ++b) ref[a * n + b] += double(x[a * k + j]) * bf(w[j * n + b]);
    EXPECT_LT(max_abs_diff(y, ref), 1e-5);
    gemm_xw(x.data(), t, k, w.data(), n, y2.data(), two);
    EXPECT_EQ(0, std::memcmp(y.data(), y2.data(), y.size() * sizeof(float)));
    gemm_xw(x.data() + 2 * k, 1, k, w.data(), n, y_single.data(), two);
    EXPECT_EQ(0, std::memcmp(y.data() + 2 * n, y_single.data(), n * sizeof(float)));
}

TEST(CpuKernels, Clamp) {
    std::vector<float> x = {-10.0f, -8.0f, -1.5f, 0.0f, 7.9f, 8.0f, 1e30f};
    clamp(x.data(), static_cast<int64_t>(x.size()), 8.0f);
    EXPECT_EQ(x, (std::vector<float>{-8.0f, -8.0f, -1.5f, 0.0f, 7.9f, 8.0f, 8.0f}));
}

TEST(CpuKernels, RopeRotateHalfMatchesDouble) {
    const int32_t hd = 12, heads = 3;
    const double theta = 500000.0;
    auto inv = rope_inv_freq(hd, theta);
    ASSERT_EQ(inv.size(), size_t(hd / 2));
    for (int32_t i = 0; i < hd / 2; ++i)
        EXPECT_FLOAT_EQ(inv[i], static_cast<float>(1.0 / std::pow(theta, 2.0 * i / hd)));
    for (int32_t pos : {0, 1, 17, 129, 2000}) {
        auto x = random_floats(heads * hd, 9 + pos);
        std::vector<float> c(hd / 2), s(hd / 2);
        rope_cos_sin(pos, inv, c.data(), s.data());
        std::vector<float> y = x;
        rope_apply(y.data(), heads, hd, c.data(), s.data());
        std::vector<double> ref(heads * hd);
        for (int32_t h = 0; h < heads; ++h)
            for (int32_t i = 0; i < hd; ++i) {
                int32_t f = i % (hd / 2);
                double ang = pos * (1.0 / std::pow(theta, 2.0 * f / hd));
                double rot = i < hd / 2 ? -x[h * hd + i + hd / 2] : x[h * hd + i - hd / 2];
                ref[h * hd + i] = x[h * hd + i] * std::cos(ang) + rot * std::sin(ang);
            }
        // fp32 angles: error grows like pos * 2^-24.
        EXPECT_LT(max_abs_diff(y, ref), 1e-5 + 4e-7 * pos) << pos;
    }
}

TEST(CpuKernels, PagedAttentionMatchesDoubleWithGqaAndScatteredBlocks) {
    const int32_t bs = 4, n_kv = 2, hd = 8, n_blocks = 9, len = 23;
    const int64_t block_floats = int64_t{bs} * n_kv * hd;
    std::vector<float> storage(n_blocks * 2 * block_floats, std::nanf(""));  // unwritten slots are NaN
    std::vector<int32_t> blocks = {7, 2, 5, 0, 8, 3};                        // 6 blocks cover 24 positions
    auto keys = random_floats(len * n_kv * hd, 10), vals = random_floats(len * n_kv * hd, 11);
    for (int32_t j = 0; j < len; ++j) {
        float *blk = storage.data() + blocks[j / bs] * 2 * block_floats;
        std::copy_n(keys.data() + j * n_kv * hd, n_kv * hd, blk + (j % bs) * n_kv * hd);
        std::copy_n(vals.data() + j * n_kv * hd, n_kv * hd, blk + block_floats + (j % bs) * n_kv * hd);
    }
    PagedKv kv{storage.data(), storage.data() + block_floats, 2 * block_floats, bs, n_kv, hd};
    const float scale = 1.0f / std::sqrt(float(hd));
    auto q = random_floats(hd, 12, 2.0f);
    for (int32_t kv_head = 0; kv_head < n_kv; ++kv_head)
        for (int32_t pos : {0, 3, 4, 22}) {
            std::vector<float> scores(pos + 1), out(hd);
            attend_one(q.data(), pos, kv, blocks, kv_head, scale, scores.data(), out.data());
            std::vector<double> s(pos + 1), ref(hd, 0.0);
            double m = -INFINITY, sum = 0;
            for (int32_t j = 0; j <= pos; ++j) {
                double acc = 0;
                for (int32_t c = 0; c < hd; ++c) acc += double(q[c]) * keys[(j * n_kv + kv_head) * hd + c];
                s[j] = acc / std::sqrt(double(hd));
                m = std::max(m, s[j]);
            }
            for (auto &v : s) sum += (v = std::exp(v - m));
            for (int32_t j = 0; j <= pos; ++j)
                for (int32_t c = 0; c < hd; ++c) ref[c] += s[j] / sum * vals[(j * n_kv + kv_head) * hd + c];
            EXPECT_LT(max_abs_diff(out, ref), 1e-5) << "pos " << pos << " head " << kv_head;
        }
}

TEST(CpuKernels, RouteTopKTiesAndNorms) {
    // Experts 1 and 3 tie for the top; 0 and 2 tie below them: the lower index ranks first.
    const std::vector<float> logits = {0.5f, 2.0f, 0.5f, 2.0f, -1.0f};
    std::vector<double> p(5);
    double m = 2.0, sum = 0;
    for (int i = 0; i < 5; ++i) sum += (p[i] = std::exp(logits[i] - m));
    for (auto &v : p) v /= sum;
    int32_t e[5];
    float w[5];
    route(logits.data(), 5, 3, std::nullopt, e, w);
    EXPECT_EQ(std::vector<int32_t>(e, e + 3), (std::vector<int32_t>{1, 3, 0}));
    EXPECT_NEAR(w[0], p[1], 1e-6);
    EXPECT_NEAR(w[2], p[0], 1e-6);
    route(logits.data(), 5, 3, 1.0, e, w);
    double s1 = p[1] + p[3] + p[0];
    EXPECT_NEAR(w[0], p[1] / s1, 1e-6);
    EXPECT_NEAR(w[2], p[0] / s1, 1e-6);
    route(logits.data(), 5, 3, 2.0, e, w);
    double s2 = std::sqrt(p[1] * p[1] + p[3] * p[3] + p[0] * p[0]);
    EXPECT_NEAR(w[1], p[3] / s2, 1e-6);
    route(logits.data(), 5, 2, 0.5, e, w);
    double sh = std::pow(std::sqrt(p[1]) + std::sqrt(p[3]), 2.0);
    EXPECT_NEAR(w[0], p[1] / sh, 1e-6);
    route(logits.data(), 5, 1, 1.0, e, w);  // top-1 normalised by itself
    EXPECT_EQ(e[0], 1);
    EXPECT_FLOAT_EQ(w[0], 1.0f);
    route(logits.data(), 5, 5, std::nullopt, e, w);
    EXPECT_EQ(std::vector<int32_t>(e, e + 5), (std::vector<int32_t>{1, 3, 0, 2, 4}));
}

TEST(CpuKernels, SiluMul) {
    std::vector<float> gate = {-3.0f, 0.0f, 0.7f, 12.0f}, up = {2.0f, 5.0f, -1.0f, 0.5f}, g(4);
    silu_mul(gate.data(), up.data(), g.data(), 4);
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(g[i], gate[i] / (1.0 + std::exp(-double(gate[i]))) * up[i], 1e-6);
}

TEST(CpuKernels, MoeExpertsMatchesDoubleAndIsPerTokenBitwise) {
    const int32_t d = 24, f = 20, n_experts = 5, top_k = 2;
    const int64_t t = 6;
    auto x = random_floats(t * d, 13);
    auto w1 = random_bf16(n_experts * f * d, 14, 0.2f), v1 = random_bf16(n_experts * f * d, 15, 0.2f),
         w2 = random_bf16(n_experts * f * d, 16, 0.2f);
    std::vector<int32_t> experts = {0, 3, 3, 1, 4, 0, 2, 3, 3, 4, 1, 0};
    std::vector<float> weights = {0.6f, 0.4f, 0.9f, 0.1f, 0.5f, 0.5f, 0.3f, 0.7f, 0.2f, 0.8f, 0.45f, 0.55f};
    auto h0 = random_floats(t * d, 17);
    ThreadPool pool(2);
    std::vector<float> h = h0;
    moe_experts(x.data(), t, d, f, n_experts, top_k, experts.data(), weights.data(), w1.data(), v1.data(),
                w2.data(), h.data(), pool);
    std::vector<double> ref(h0.begin(), h0.end());
    for (int64_t a = 0; a < t; ++a)
        for (int32_t r = 0; r < top_k; ++r) {
            int64_t e = experts[a * top_k + r];
            std::vector<double> g(f);
            for (int32_t i = 0; i < f; ++i) {
                double gate = 0, up = 0;
                for (int32_t c = 0; c < d; ++c) {
                    gate += double(x[a * d + c]) * bf(w1[(e * f + i) * d + c]);
                    up += double(x[a * d + c]) * bf(v1[(e * f + i) * d + c]);
                }
                g[i] = gate / (1.0 + std::exp(-gate)) * up;
            }
            for (int32_t c = 0; c < d; ++c) {
                double o = 0;
                for (int32_t i = 0; i < f; ++i) o += g[i] * bf(w2[(e * f + i) * d + c]);
                ref[a * d + c] += weights[a * top_k + r] * o;
            }
        }
    EXPECT_LT(max_abs_diff(h, ref), 1e-4);
    // Token 3 alone, on one thread, gives the same bits.
    std::vector<float> h3(h0.begin() + 3 * d, h0.begin() + 4 * d);
    ThreadPool one(1);
    moe_experts(x.data() + 3 * d, 1, d, f, n_experts, top_k, experts.data() + 3 * top_k,
                weights.data() + 3 * top_k, w1.data(), v1.data(), w2.data(), h3.data(), one);
    EXPECT_EQ(0, std::memcmp(h3.data(), h.data() + 3 * d, d * sizeof(float)));
}

}  // namespace
}  // namespace dbrx::cpu
