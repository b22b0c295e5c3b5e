// Paged KV caches on the host in either KvLayout (kernels.h), for the CUDA tests: the layouts every
// attention test runs in, and copies between layouts through kv_offset, so that a test can build a
// cache in the layout under test and hand the CPU reference (cpu::PagedKv reads slot-major) a copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <vector>

#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
// GoogleTest prints parameters of this type by name.
inline void PrintTo(KvLayout layout, std::ostream *os) { *os << kv_layout_name(layout); }
}  // namespace dbrx::cuda

namespace dbrx::cuda::test {

constexpr KvLayout kKvLayouts[] = {KvLayout::HeadMajor, KvLayout::SlotMajor};

// The offsets of a layout (no base): for host copies indexed through kv_offset.
inline KvLayer kv_shape(int32_t block_size, int32_t n_kv_heads, int32_t head_dim, KvLayout layout) {
    return kv_layer(nullptr, block_size, n_kv_heads, head_dim, layout);
}

// `src`, n_blocks blocks laid out as `from`, laid out as `to` (the same block size, heads and head dim).
template <class T>
std::vector<T> relayout(const std::vector<T> &src, int64_t n_blocks, const KvLayer &from, const KvLayer &to) {
    std::vector<T> dst(static_cast<size_t>(n_blocks * to.block_stride));
    for (int64_t b = 0; b < n_blocks; ++b)
        for (int32_t j = 0; j < from.block_size; ++j)
            for (int32_t h = 0; h < from.n_kv_heads; ++h) {
                const int64_t s = kv_offset(from, b, j, h), d = kv_offset(to, b, j, h);
                std::copy_n(src.begin() + s, from.head_dim, dst.begin() + d);
                std::copy_n(src.begin() + s + from.v_offset, from.head_dim, dst.begin() + d + to.v_offset);
            }
    return dst;
}

// `src` (laid out as `from`) as the slot-major copy that cpu::PagedKv reads.
template <class T> std::vector<T> slot_major(const std::vector<T> &src, int64_t n_blocks, const KvLayer &from) {
    return relayout(src, n_blocks, from, kv_shape(from.block_size, from.n_kv_heads, from.head_dim, KvLayout::SlotMajor));
}

}  // namespace dbrx::cuda::test
