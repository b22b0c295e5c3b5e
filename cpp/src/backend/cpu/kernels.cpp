#include "backend/cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace dbrx::cpu {


namespace {

// Eight floats as one value (GCC/Clang vector extension): element-wise arithmetic, so each lane is
// exactly the scalar loop it replaces, on any instruction set the compiler targets.
using f32x8 = float __attribute__((vector_size(32)));
// Only inlined helpers take or return f32x8, so the non-AVX calling convention never matters.
#pragma GCC diagnostic ignored "-Wpsabi"

inline f32x8 load8(const float *p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// The fixed tail of every dot product: lanes combined pairwise, then the leftover elements.
inline float finish_dot(f32x8 acc, const float *x, const float *row, int64_t from, int64_t n) {
    float lanes[8];
    std::memcpy(lanes, &acc, sizeof lanes);
    for (int width = 4; width >= 1; width /= 2)
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
    float s = lanes[0];
    for (int64_t t = from; t < n; ++t) s += x[t] * row[t];
    return s;
}

inline int64_t whole8(int64_t n) { return n - n % 8; }

// The hot loops get an AVX2 clone chosen at load time. AVX2 without FMA: element-wise vector
// arithmetic rounds exactly like the SSE2 default (no fused multiply-add can be contracted in), so
// the results are the same bits on every x86-64 machine.
#define DBRX_CPU_CLONES __attribute__((target_clones("avx2", "default")))

// Four dot products of x with four rows, each exactly dot(x, row, n): same lanes, same tail.
// Named accumulators keep them in registers.
DBRX_CPU_CLONES void dot4(const float *x, const float *r0, const float *r1, const float *r2, const float *r3, int64_t n,
          float *out) {
    f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const int64_t m = whole8(n);
    for (int64_t i = 0; i < m; i += 8) {
        const f32x8 xv = load8(x + i);
        a0 += xv * load8(r0 + i);
        a1 += xv * load8(r1 + i);
        a2 += xv * load8(r2 + i);
        a3 += xv * load8(r3 + i);
    }
    out[0] = finish_dot(a0, x, r0, m, n);
    out[1] = finish_dot(a1, x, r1, m, n);
    out[2] = finish_dot(a2, x, r2, m, n);
    out[3] = finish_dot(a3, x, r3, m, n);
}

constexpr int64_t kColTile = 64;

// yt[c] = sum_{j<k} xt[j] * tile[j][c] for a full tile of kColTile columns (tile rows contiguous),
// accumulated in registers, sequential in j.
DBRX_CPU_CLONES void xw_tile(const float *xt, const float *tile, int64_t k, float *yt) {
    f32x8 acc[kColTile / 8] = {};
    for (int64_t j = 0; j < k; ++j) {
        const f32x8 xv = f32x8{} + xt[j];
        for (int v = 0; v < kColTile / 8; ++v) acc[v] += xv * load8(tile + j * kColTile + v * 8);
    }
    std::memcpy(yt, acc, sizeof acc);
}

// The same sums for a narrower last tile, one column at a time (same order, same bits).
void xw_tile_narrow(const float *xt, const float *tile, int64_t k, int64_t width, float *yt) {
    for (int64_t c = 0; c < width; ++c) {
        float acc = 0;
        for (int64_t j = 0; j < k; ++j) acc += xt[j] * tile[j * width + c];
        yt[c] = acc;
    }
}

}  // namespace

DBRX_CPU_CLONES void bf16_to_f32(const bf16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

DBRX_CPU_CLONES float dot(const float *a, const float *b, int64_t n) {
    f32x8 acc = {};
    const int64_t m = whole8(n);
    for (int64_t i = 0; i < m; i += 8) acc += load8(a + i) * load8(b + i);
    return finish_dot(acc, a, b, m, n);
}

void layernorm(const float *x, const bf16_t *w, float *y, int64_t n_tokens, int64_t d, ThreadPool &pool,
               float eps) {
    pool.parallel_for(n_tokens, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const float *xt = x + t * d;
            float *yt = y + t * d;
            double sum = 0;
            for (int64_t i = 0; i < d; ++i) sum += xt[i];
            double mean = sum / static_cast<double>(d);
            double sq = 0;
            for (int64_t i = 0; i < d; ++i) {
                double c = xt[i] - mean;
                sq += c * c;
            }
            double rstd = 1.0 / std::sqrt(sq / static_cast<double>(d) + static_cast<double>(eps));
            for (int64_t i = 0; i < d; ++i)
                yt[i] = static_cast<float>((xt[i] - mean) * rstd) * bf16_to_float(w[i]);
        }
    }, slice_grain(3 * d));
}

void gemm_xwt(const float *x, int64_t n_tokens, int64_t k, const bf16_t *w, int64_t n_out, float *y,
              ThreadPool &pool) {
    if (n_tokens <= 0) return;
    constexpr int kTile = 4;  // weight rows per pass over the tokens: x is streamed once per tile
    const int64_t grain = std::max<int64_t>(kTile, slice_grain(k * n_tokens));
    pool.parallel_for(n_out, [&](int64_t n0, int64_t n1) {
        std::vector<float> buf(static_cast<size_t>(kTile * k));
        const float *r0 = buf.data(), *r1 = r0 + k, *r2 = r1 + k, *r3 = r2 + k;
        int64_t n = n0;
        for (; n + kTile <= n1; n += kTile) {
            bf16_to_f32(w + n * k, buf.data(), kTile * k);
            for (int64_t t = 0; t < n_tokens; ++t) {
                float out[kTile];
                dot4(x + t * k, r0, r1, r2, r3, k, out);
                for (int r = 0; r < kTile; ++r) y[t * n_out + n + r] = out[r];
            }
        }
        for (; n < n1; ++n) {
            bf16_to_f32(w + n * k, buf.data(), k);
            for (int64_t t = 0; t < n_tokens; ++t) y[t * n_out + n] = dot(x + t * k, buf.data(), k);
        }
    }, grain);
}

void gemm_xw(const float *x, int64_t n_tokens, int64_t k, const bf16_t *w, int64_t n_out, float *y,
             ThreadPool &pool) {
    if (n_tokens <= 0) return;
    // Threads split the columns in tiles; a tile of W is converted once and serves every token.
    const int64_t n_tiles = (n_out + kColTile - 1) / kColTile;
    pool.parallel_for(n_tiles, [&](int64_t i0, int64_t i1) {
        std::vector<float> tile(static_cast<size_t>(k * kColTile));
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t c0 = i * kColTile, width = std::min(kColTile, n_out - c0);
            for (int64_t j = 0; j < k; ++j) bf16_to_f32(w + j * n_out + c0, tile.data() + j * width, width);
            for (int64_t t = 0; t < n_tokens; ++t) {
                if (width == kColTile)
                    xw_tile(x + t * k, tile.data(), k, y + t * n_out + c0);
                else
                    xw_tile_narrow(x + t * k, tile.data(), k, width, y + t * n_out + c0);
            }
        }
    }, slice_grain(kColTile * k * n_tokens));
}

void clamp(float *x, int64_t n, float limit) {
    for (int64_t i = 0; i < n; ++i) x[i] = std::min(std::max(x[i], -limit), limit);
}

std::vector<float> rope_inv_freq(int32_t head_dim, double theta) {
    std::vector<float> inv(static_cast<size_t>(head_dim / 2));
    for (int32_t i = 0; i < head_dim / 2; ++i)
        inv[i] = static_cast<float>(1.0 / std::pow(theta, (2.0 * i) / head_dim));
    return inv;
}

void rope_cos_sin(int32_t pos, std::span<const float> inv_freq, float *cos_out, float *sin_out) {
    float p = static_cast<float>(pos);
    for (size_t i = 0; i < inv_freq.size(); ++i) {
        float angle = p * inv_freq[i];
        cos_out[i] = std::cos(angle);
        sin_out[i] = std::sin(angle);
    }
}

void rope_apply(float *x, int32_t n_heads, int32_t head_dim, const float *cos, const float *sin) {
    int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; ++h) {
        float *xh = x + static_cast<int64_t>(h) * head_dim;
        for (int32_t i = 0; i < half; ++i) {
            float x1 = xh[i], x2 = xh[i + half];
            xh[i] = x1 * cos[i] - x2 * sin[i];
            xh[i + half] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

void attend_one(const float *q, int32_t pos, const PagedKv &kv, std::span<const int32_t> blocks,
                int32_t kv_head, float scale, float *scores, float *out) {
    const int64_t hd = kv.head_dim;
    auto offset = [&](int32_t j) {
        int64_t block = blocks[j / kv.block_size];
        int64_t slot = j % kv.block_size;
        return block * kv.block_stride + (slot * kv.n_kv_heads + kv_head) * hd;
    };
    float m = -INFINITY;
    for (int32_t j = 0; j <= pos; ++j) {
        scores[j] = dot(q, kv.k + offset(j), hd) * scale;
        m = std::max(m, scores[j]);
    }
    float sum = 0;
    for (int32_t j = 0; j <= pos; ++j) {
        scores[j] = std::exp(scores[j] - m);
        sum += scores[j];
    }
    std::fill(out, out + hd, 0.0f);
    for (int32_t j = 0; j <= pos; ++j) {
        const float *vj = kv.v + offset(j);
        float e = scores[j];
        for (int64_t c = 0; c < hd; ++c) out[c] += e * vj[c];
    }
    for (int64_t c = 0; c < hd; ++c) out[c] /= sum;
}

void route(const float *logits, int32_t n_experts, int32_t top_k, std::optional<double> norm_p,
           int32_t *experts, float *weights) {
    std::vector<float> p(static_cast<size_t>(n_experts));
    float m = -INFINITY;
    for (int32_t e = 0; e < n_experts; ++e) m = std::max(m, logits[e]);
    float sum = 0;
    for (int32_t e = 0; e < n_experts; ++e) {
        p[e] = std::exp(logits[e] - m);
        sum += p[e];
    }
    for (int32_t e = 0; e < n_experts; ++e) p[e] /= sum;
    std::vector<char> taken(static_cast<size_t>(n_experts), 0);
    for (int32_t r = 0; r < top_k; ++r) {
        int32_t best = -1;
        for (int32_t e = 0; e < n_experts; ++e)
            if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;  // strict: ties keep the lower index
        taken[best] = 1;
        experts[r] = best;
        weights[r] = p[best];
    }
    if (!norm_p) return;
    double acc = 0;
    for (int32_t r = 0; r < top_k; ++r) acc += std::pow(std::fabs(static_cast<double>(weights[r])), *norm_p);
    double norm = std::pow(acc, 1.0 / *norm_p);
    if (!(norm > 0)) return;
    for (int32_t r = 0; r < top_k; ++r) weights[r] = static_cast<float>(weights[r] / norm);
}

void silu_mul(const float *gate, const float *up, float *g, int64_t n) {
    for (int64_t i = 0; i < n; ++i) g[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void moe_experts(const float *x, int64_t n_tokens, int32_t d_model, int32_t ffn, int32_t n_experts, int32_t top_k,
                 const int32_t *experts, const float *weights, const bf16_t *w1, const bf16_t *v1,
                 const bf16_t *w2, float *h, ThreadPool &pool) {
    const int64_t d = d_model, f = ffn, k = top_k;
    // slots[e]: the (token * top_k + rank) entries routed to expert e, in token order.
    std::vector<std::vector<int64_t>> slots(static_cast<size_t>(n_experts));
    for (int64_t i = 0; i < n_tokens * k; ++i) slots[experts[i]].push_back(i);
    std::vector<float> expert_out(static_cast<size_t>(n_tokens * k * d));
    std::vector<float> xs, gate, up, y;
    for (int32_t e = 0; e < n_experts; ++e) {
        const auto &sl = slots[e];
        if (sl.empty()) continue;
        int64_t n = static_cast<int64_t>(sl.size());
        xs.resize(n * d);
        gate.resize(n * f);
        up.resize(n * f);
        y.resize(n * d);
        for (int64_t i = 0; i < n; ++i) std::copy_n(x + (sl[i] / k) * d, d, xs.data() + i * d);
        const int64_t base = static_cast<int64_t>(e) * f * d;
        gemm_xwt(xs.data(), n, d, w1 + base, f, gate.data(), pool);
        gemm_xwt(xs.data(), n, d, v1 + base, f, up.data(), pool);
        silu_mul(gate.data(), up.data(), gate.data(), n * f);
        gemm_xw(gate.data(), n, f, w2 + base, d, y.data(), pool);
        for (int64_t i = 0; i < n; ++i) std::copy_n(y.data() + i * d, d, expert_out.data() + sl[i] * d);
    }
    pool.parallel_for(n_tokens, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
            for (int64_t c = 0; c < d; ++c) {
                float acc = 0;
                for (int64_t r = 0; r < k; ++r) acc += weights[t * k + r] * expert_out[(t * k + r) * d + c];
                h[t * d + c] += acc;
            }
    }, slice_grain(k * d));
}

}  // namespace dbrx::cpu
