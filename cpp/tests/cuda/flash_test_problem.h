// The inputs of a prefill flash-attention test (test_cuda_flash.cpp, test_cuda_flash_wgmma.cpp): a paged
// cache, chunks of new rows over cached prefixes, their tiles, and the cpu::attend_one reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "kv_layout_test_util.h"

namespace dbrx::cuda::test {

struct Shape {
    int32_t H, KV, hd;
};
struct Chunk {
    int32_t prefix, n_new;  // cached positions before the chunk, rows of the chunk
};

// One launch's inputs on the host: a paged cache in `layout` with a shuffled block table (slots past
// each sequence's end hold NaN, so reading one shows), the chunks' queries and their tiles.
struct Problem {
    Shape s;
    int32_t bs = 16, n_blocks = 0;
    std::vector<Chunk> chunks;
    std::vector<bf16_t> cache;
    std::vector<int32_t> blocks, block_off, new_pos, new_seq, tiles;
    std::vector<float> q;  // [Tn][H][hd]
    KvLayout layout = KvLayout::SlotMajor;
    int64_t half() const { return static_cast<int64_t>(bs) * s.KV * s.hd; }
    int32_t n_tokens() const { return static_cast<int32_t>(new_pos.size()); }
    // The cache's offsets: p.cache[kv_offset(p.kv(), block, slot, kv head) (+ v_offset) + i].
    KvLayer kv() const { return kv_shape(bs, s.KV, s.hd, layout); }
};

// `p` with its cache in `layout` (the same keys and values).
inline Problem in_layout(const Problem &p, KvLayout layout) {
    Problem r = p;
    r.layout = layout;
    r.cache = relayout(p.cache, p.n_blocks, p.kv(), r.kv());
    return r;
}

// Random keys, values and queries; the cache is in `layout` (the keys and values do not depend on it).
inline Problem make_problem(Shape s, int32_t bs, std::vector<Chunk> chunks, uint32_t seed,
                            KvLayout layout = KvLayout::HeadMajor) {
    Problem p{s, bs, 0, std::move(chunks)};
    for (const auto &c : p.chunks) p.n_blocks += (c.prefix + c.n_new + bs - 1) / bs;
    p.blocks.resize(p.n_blocks);
    std::iota(p.blocks.begin(), p.blocks.end(), 0);
    std::shuffle(p.blocks.begin(), p.blocks.end(), std::mt19937(seed));
    p.cache = to_bf16(uniform(static_cast<size_t>(p.n_blocks) * 2 * p.half(), -1.f, 1.f, seed + 1));
    int32_t boff = 0;
    for (size_t i = 0; i < p.chunks.size(); ++i) {
        const int32_t len = p.chunks[i].prefix + p.chunks[i].n_new, nb = (len + bs - 1) / bs;
        p.block_off.push_back(boff);
        const KvLayer kv = p.kv();
        for (int32_t slot = len; slot < nb * bs; ++slot)  // unused tail of the last block
            for (int32_t h = 0; h < s.KV; ++h) {
                const int64_t off = kv_offset(kv, p.blocks[boff + slot / bs], slot % bs, h);
                for (int32_t i = 0; i < s.hd; ++i) p.cache[off + i] = p.cache[off + kv.v_offset + i] = 0x7fc0;
            }
        boff += nb;
        const int32_t first = p.n_tokens();
        for (int32_t r = 0; r < p.chunks[i].n_new; ++r) {
            p.new_pos.push_back(p.chunks[i].prefix + r);
            p.new_seq.push_back(static_cast<int32_t>(i));
        }
        for (int32_t r = 0; r < p.chunks[i].n_new; r += kFlashTile)
            p.tiles.insert(p.tiles.end(), {static_cast<int32_t>(i), first + r, std::min(kFlashTile, p.chunks[i].n_new - r),
                                           p.chunks[i].prefix + r});
    }
    // Wide enough that the softmax is far from flat.
    p.q = uniform(static_cast<size_t>(p.n_tokens()) * s.H * s.hd, -3.f, 3.f, seed + 2);
    return layout == p.layout ? p : in_layout(p, layout);
}

// The reference of (token t, head h) by cpu::attend_one over a slot-major fp32 copy of the bf16 cache.
struct Reference {
    const Problem &p;
    std::vector<float> cache = to_f32(slot_major(p.cache, p.n_blocks, p.kv()));
    std::vector<float> scores;
    void attend(int32_t t, int32_t h, float *out) {
        const Shape &s = p.s;
        cpu::PagedKv pk{cache.data(), cache.data() + p.half(), 2 * p.half(), p.bs, s.KV, s.hd};
        const int32_t sq = p.new_seq[t], len = p.chunks[sq].prefix + p.chunks[sq].n_new;
        std::span<const int32_t> table(p.blocks.data() + p.block_off[sq], (len + p.bs - 1) / p.bs);
        scores.resize(len);
        cpu::attend_one(p.q.data() + (int64_t{t} * s.H + h) * s.hd, p.new_pos[t], pk, table, h / (s.H / s.KV),
                        1.f / std::sqrt(static_cast<float>(s.hd)), scores.data(), out);
    }
};

// A problem's inputs on the device (its cache in the problem's layout) and an output buffer of every
// row, which output() reads back, counting non-finite values as failures.
struct DeviceInputs {
    DeviceBuffer cache, q, pos, seq, boff, blocks, tiles, out;
    KvLayer kv;
    TokenMeta meta;
    int32_t n_tiles, Tn, H, hd;
    explicit DeviceInputs(const Problem &p)
        : cache(to_device(p.cache)), q(to_device(p.q)), pos(to_device(p.new_pos)), seq(to_device(p.new_seq)),
          boff(to_device(p.block_off)), blocks(to_device(p.blocks)), tiles(to_device(p.tiles)),
          out(sizeof(bf16_t) * std::max<size_t>(1, p.q.size())),
          kv(kv_layer(cache.as<bf16_t>(), p.bs, p.s.KV, p.s.hd, p.layout)),
          meta{pos.as<int32_t>(), seq.as<int32_t>(), boff.as<int32_t>(), blocks.as<int32_t>()},
          n_tiles(static_cast<int32_t>(p.tiles.size() / 4)), Tn(p.n_tokens()), H(p.s.H), hd(p.s.hd) {}
    std::vector<float> output(const std::string &what) const {
        auto got = to_f32(to_host<bf16_t>(out.get(), static_cast<size_t>(Tn) * H * hd));
        // rel_max_err skips NaN (std::max), so unwritten or poisoned rows are counted here.
        const auto bad = std::count_if(got.begin(), got.end(), [](float x) { return !std::isfinite(x); });
        EXPECT_EQ(bad, 0) << "non-finite outputs of " << what;
        return got;
    }
};

}  // namespace dbrx::cuda::test
