// Prefill flash attention on wgmma: host side of flash_prefill_wgmma_kernel.cuh. One CTA per (tile of
// kFlashTile query rows, query head), the tiles as flash_prefill takes them.
#include <atomic>
#include <cstdint>
#include <string>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/flash_prefill_common.cuh"
#include "backend/cuda/flash_prefill_wgmma.h"
#include "backend/cuda/flash_prefill_wgmma_kernel.cuh"

namespace dbrx::cuda {
namespace wgfa {
namespace {

// Compiled without sm_90a the kernel body is empty and uses a handful of registers; the real one
// holds S, O and P in registers (well over 100), which tells the two apart without a device round trip.
constexpr int kMinRealRegs = 96;

template <class C> const void *kernel_of() { return reinterpret_cast<const void *>(flash_wgmma_kernel<C>); }

template <class C> bool probe() {
    int dev = 0, major = 0, minor = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
        return false;
    if (major != 9 || minor != 0 || static_cast<size_t>(optin) < C::kSmem) return false;
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel_of<C>()) != cudaSuccess) {
        (void)cudaGetLastError();  // no image for this device (a non-sticky error): clear it
        return false;
    }
    return attr.binaryVersion == 90 && attr.numRegs >= kMinRealRegs;
}
// Probed once per process (the devices of one process are taken to be of one kind).
template <class C> bool usable() {
    static std::atomic<int> state{0};  // 0 unknown, 1 usable, 2 not
    int s = state.load(std::memory_order_acquire);
    if (s == 0) {
        s = probe<C>() ? 1 : 2;
        state.store(s, std::memory_order_release);
    }
    return s == 1;
}

template <class C>
void launch(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta, KvLayer kv,
            bf16_t *out, cudaStream_t stream) {
    if (!usable<C>()) invalid_argument("flash_prefill_wgmma: needs an sm_90 device and a build with sm_90a");
    static std::atomic<uint32_t> smem_set{0};
    flash_common::launch<C>("flash_prefill_wgmma", flash_wgmma_kernel<C>, smem_set, q, n_tiles, n_heads, tiles, meta, kv,
                            out, stream);
}

using flash_common::Launch;
struct Variant {
    const char *name;
    Launch fn;
    bool (*ok)();
};
// Not yet measured on the H200: the test CudaFlashWgmma.DbrxLongSequence* times each against flash_prefill.
// 128 keys x 2 stages is FlashAttention-3's shape at head dim 128 (165 KB of shared memory; 3 stages
// of 128 keys do not fit in 227 KB).
constexpr Variant kVariants[] = {
    {"wgmma 128 keys, 2 stages", launch<Cfg<128, 2>>, usable<Cfg<128, 2>>},
    {"wgmma 64 keys, 3 stages", launch<Cfg<64, 3>>, usable<Cfg<64, 3>>},
    {"wgmma 64 keys, 4 stages", launch<Cfg<64, 4>>, usable<Cfg<64, 4>>},
};
constexpr int32_t kDefault = 0;

}  // namespace

int32_t variant_count() { return static_cast<int32_t>(std::size(kVariants)); }
const char *variant_name(int32_t variant) { return kVariants[variant].name; }
int32_t default_variant() { return kDefault; }

void prefill_variant(int32_t variant, const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles,
                     TokenMeta meta, KvLayer kv, bf16_t *out, cudaStream_t stream) {
    if (variant < 0 || variant >= variant_count())
        invalid_argument("flash_prefill_wgmma: variant " + std::to_string(variant) + " out of range");
    if (kv.head_dim != 128)
        invalid_argument("flash_prefill_wgmma: head_dim " + std::to_string(kv.head_dim) + " (only 128 is built)");
    if (kv.block_size < 1 || kv.n_kv_heads < 1 || n_heads < 1 || n_heads % kv.n_kv_heads != 0)
        invalid_argument("flash_prefill_wgmma: block_size " + std::to_string(kv.block_size) + ", " +
                         std::to_string(n_heads) + " query heads over " + std::to_string(kv.n_kv_heads) + " KV heads");
    // 16-byte copies of K/V rows and 32-byte loads of Q rows need these alignments.
    check_kv_layer(kv, "flash_prefill_wgmma");
    if (reinterpret_cast<uintptr_t>(kv.base) % 16 != 0 || kv.block_stride % 8 != 0 || kv.v_offset % 8 != 0 ||
        kv.head_stride % 8 != 0 || kv.row_stride % 8 != 0 || reinterpret_cast<uintptr_t>(q) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(out) % 4 != 0)
        invalid_argument("flash_prefill_wgmma: K/V rows, q or out misaligned (block_stride " +
                         std::to_string(kv.block_stride) + ", v_offset " + std::to_string(kv.v_offset) +
                         ", head_stride " + std::to_string(kv.head_stride) + ", row_stride " +
                         std::to_string(kv.row_stride) + ")");
    if (n_tiles < 0) invalid_argument("flash_prefill_wgmma: " + std::to_string(n_tiles) + " tiles");
    if (n_tiles == 0) return;
    kVariants[variant].fn(q, n_tiles, n_heads, tiles, meta, kv, out, stream);
}

}  // namespace wgfa

bool flash_prefill_wgmma_supported(int32_t head_dim, int32_t block_size) {
    return head_dim == 128 && block_size >= 1 && wgfa::kVariants[wgfa::kDefault].ok();
}

void flash_prefill_wgmma(const float *q, int32_t n_tiles, int32_t n_heads, const int32_t *tiles, TokenMeta meta,
                         KvLayer kv, bf16_t *out, cudaStream_t stream) {
    wgfa::prefill_variant(wgfa::kDefault, q, n_tiles, n_heads, tiles, meta, kv, out, stream);
}

}  // namespace dbrx::cuda
