#include "backend/cpu/cpu_kv_pool.h"

#include <new>
#include <string>

#include "util/error.h"

namespace dbrx::cpu {

CpuKvPool::CpuKvPool(int32_t n_layers, int32_t n_blocks, int32_t block_size, int32_t n_kv_heads, int32_t head_dim)
    : n_layers_(n_layers), n_blocks_(n_blocks), block_size_(block_size), n_kv_heads_(n_kv_heads), head_dim_(head_dim) {
    if (n_blocks <= 0 || block_size <= 0)
        invalid_argument("CPU KV pool: n_blocks (" + std::to_string(n_blocks) + ") and block_size (" +
                         std::to_string(block_size) + ") must be positive");
    const std::string what = "CPU KV pool of " + std::to_string(n_blocks) + " blocks of " +
                             std::to_string(block_size) + " tokens";
    // Sizes come from callers: refuse absurd products before they overflow or reach the allocator
    // (sanitizer allocators abort on such requests instead of throwing).
    constexpr long double kMaxBytes = static_cast<long double>(int64_t{1} << 46);  // 64 TiB
    long double floats = static_cast<long double>(n_layers) * n_blocks * 2 * block_floats();
    if (floats * sizeof(float) > kMaxBytes)
        fail(DBRX_ERR_OUT_OF_MEMORY, what + ": " + std::to_string(static_cast<double>(floats * sizeof(float))) +
                                         " bytes is beyond any host");
    try {
        data_ = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(floats));
    } catch (const std::bad_alloc &) {
        fail(DBRX_ERR_OUT_OF_MEMORY, what + ": allocation of " +
                                         std::to_string(static_cast<int64_t>(floats) * 4) + " bytes failed");
    }
}

PagedKv CpuKvPool::layer_view(int32_t layer) const {
    PagedKv view;
    view.k = base(layer, 0);
    view.v = base(layer, 0) + block_floats();
    view.block_stride = 2 * block_floats();
    view.block_size = block_size_;
    view.n_kv_heads = n_kv_heads_;
    view.head_dim = head_dim_;
    return view;
}

}  // namespace dbrx::cpu
