// Prefill attention on the tensor cores: host side of the flash kernel (flash_prefill_kernel.cuh).
// One CTA per (tile of kFlashTile query rows, query head); the tiles come from the backend, which
// cuts each long chunk of a sequence into tiles of consecutive positions.
#include <atomic>
#include <string>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/flash_prefill_common.cuh"
#include "backend/cuda/flash_prefill_kernel.cuh"
#include "backend/cuda/flash_prefill_variants.cuh"
#include "backend/cuda/kernels.h"

namespace dbrx::cuda {
namespace flash {
namespace {

template <class C>
void launch(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv,
            bf16_t *out, cudaStream_t stream) {
    static std::atomic<uint32_t> smem_set{0};
    flash_common::launch<C>("flash_prefill", flash_prefill_kernel<C>, smem_set, q, n_tiles, n_heads, tiles, meta, kv, out,
                            stream);
}

using flash_common::Launch;
struct Variant {
    const char *name;
    Launch fn;
};
// Measured on the H200 (2026-11-29, test CudaFlash.DbrxLongSequence*, 48/8 heads, causal), S=4096 /
// S=16384: 4x32 rows x 32 keys 0.764 / 10.79 ms (FlashAttention-2's shape: 255 registers, no spills,
// 2 CTAs per SM); 32 keys 3 stages 0.769 / 10.95; 64 keys 0.779 / 10.82; 8x16 rows x 64 keys 2 CTAs/SM
// 0.805 / 11.58; 8x16 x 128 keys 0.814 / 11.14; 8x16 x 64 keys at 1 CTA/SM 0.853 / 11.96 (dropped).
constexpr Variant kVariants[] = {
    {"4 warps x 32 rows, 32 keys, 2 stages", launch<Cfg<128, 4, 2, 2, 1, 32>>},
    {"4 warps x 32 rows, 32 keys, 3 stages", launch<Cfg<128, 4, 2, 3, 1, 32>>},
    {"4 warps x 32 rows, 64 keys, 2 stages", launch<Cfg<128, 4, 2, 2>>},
    {"8 warps x 16 rows, 64 keys, 2 stages, 2 CTAs/SM", launch<Cfg<128, 8, 1, 2, 2>>},
    {"8 warps x 16 rows, 128 keys, 2 stages", launch<Cfg<128, 8, 1, 2, 1, 128>>},
};
constexpr int32_t kDefault = 0;

}  // namespace

int32_t variant_count() { return static_cast<int32_t>(std::size(kVariants)); }
const char *variant_name(int32_t variant) { return kVariants[variant].name; }
int32_t default_variant() { return kDefault; }

void prefill_variant(int32_t variant, const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles,
                     TokenMeta meta, KvLayer kv, bf16_t *out, cudaStream_t stream) {
    if (variant < 0 || variant >= variant_count())
        invalid_argument("flash_prefill: variant " + std::to_string(variant) + " out of range");
    if (kv.head_dim != 128)
        invalid_argument("flash_prefill: variants are built for head_dim 128, not " + std::to_string(kv.head_dim));
    if (n_tiles == 0) return;
    kVariants[variant].fn(q, n_tiles, n_heads, tiles, meta, kv, out, stream);
}

}  // namespace flash

bool flash_prefill_supported(int32_t head_dim) {
    return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

void flash_prefill(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv,
                   bf16_t *out, cudaStream_t stream) {
    using flash::Cfg;
    if (n_tiles == 0) return;
    switch (kv.head_dim) {
    case 16: flash::launch<Cfg<16, 8, 1, 2>>(q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    case 32: flash::launch<Cfg<32, 8, 1, 2>>(q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    case 64: flash::launch<Cfg<64, 8, 1, 2>>(q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    case 128: flash::prefill_variant(flash::kDefault, q, n_tiles, n_heads, tiles, meta, kv, out, stream); break;
    default: invalid_argument("flash_prefill: head_dim " + std::to_string(kv.head_dim) + " not supported");
    }
}

}  // namespace dbrx::cuda
