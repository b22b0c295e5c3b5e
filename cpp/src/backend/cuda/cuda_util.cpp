#include "backend/cuda/cuda_util.h"

#include <vector>

#include <mutex>

#include <algorithm>

namespace dbrx::cuda {

void throw_cuda(cudaError_t err, const char *what, const char *file, int line) {
    dbrx_status st = err == cudaErrorMemoryAllocation ? DBRX_ERR_OUT_OF_MEMORY : DBRX_ERR_INTERNAL;
    throw Error(st, std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") in " +
                        what + " at " + file + ":" + std::to_string(line));
}

void throw_cublas(cublasStatus_t s, const char *what, const char *file, int line) {
    dbrx_status st = s == CUBLAS_STATUS_ALLOC_FAILED ? DBRX_ERR_OUT_OF_MEMORY : DBRX_ERR_INTERNAL;
    throw Error(st, std::string("cuBLAS error ") + cublasGetStatusName(s) + " in " + what + " at " + file + ":" +
                        std::to_string(line));
}

namespace {
constexpr int kEpochDevices = 64;
std::atomic<uint64_t> g_allocation_epoch[kEpochDevices];

void count_allocation() {
    int dev = 0;
    // Devices beyond the table share its last slot (their graphs are then dropped more often).
    if (cudaGetDevice(&dev) == cudaSuccess)
        g_allocation_epoch[dev < kEpochDevices ? dev : kEpochDevices - 1].fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

uint64_t device_allocation_epoch(int device) {
    return g_allocation_epoch[device >= 0 && device < kEpochDevices ? device : kEpochDevices - 1].load(
        std::memory_order_relaxed);
}

DeviceBuffer::DeviceBuffer(size_t bytes, const char *what) { reserve(bytes, what); }

void DeviceBuffer::reserve(size_t bytes, const char *what) {
    if (bytes <= bytes_) return;
    count_allocation();  // before release(): the old address is gone even if the allocation fails
    release();
    cudaError_t err = cudaMalloc(&ptr_, bytes);
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free allocation error
        ptr_ = nullptr;
        throw Error(err == cudaErrorMemoryAllocation ? DBRX_ERR_OUT_OF_MEMORY : DBRX_ERR_INTERNAL,
                    std::string("cudaMalloc of ") + std::to_string(bytes) + " bytes for " + what +
                        " failed: " + cudaGetErrorString(err));
    }
    bytes_ = bytes;
}

PinnedBuffer::PinnedBuffer(size_t bytes) { reserve(bytes); }

void PinnedBuffer::reserve(size_t bytes) {
    if (bytes <= bytes_) return;
    release();
    DBRX_CUDA_CHECK(cudaMallocHost(&ptr_, bytes));
    bytes_ = bytes;
}

namespace {
struct RetireHooks {
    std::mutex mu;
    std::vector<StreamRetireHook> hooks;
};
RetireHooks &retire_hooks() {
    static RetireHooks *h = new RetireHooks;  // never destroyed: Streams may die during static destruction
    return *h;
}
}  // namespace

void add_stream_retire_hook(StreamRetireHook hook) {
    RetireHooks &h = retire_hooks();
    std::lock_guard<std::mutex> lock(h.mu);
    if (std::find(h.hooks.begin(), h.hooks.end(), hook) == h.hooks.end()) h.hooks.push_back(hook);
}

Stream::Stream() { DBRX_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
Stream::~Stream() {
    if (!s_) return;
    std::vector<StreamRetireHook> hooks;
    {
        RetireHooks &h = retire_hooks();
        std::lock_guard<std::mutex> lock(h.mu);
        hooks = h.hooks;
    }
    for (StreamRetireHook hook : hooks) hook(s_);
    cudaStreamDestroy(s_);
}

CublasHandle::CublasHandle(cudaStream_t stream) {
    DBRX_CUBLAS_CHECK(cublasCreate(&h_));
    DBRX_CUBLAS_CHECK(cublasSetStream(h_, stream));
}
CublasHandle::~CublasHandle() {
    if (h_) cublasDestroy(h_);
}

void allow_max_dynamic_smem(const void *kernel, std::atomic<uint32_t> &done) {
    int dev = 0;
    DBRX_CUDA_CHECK(cudaGetDevice(&dev));
    const uint32_t bit = dev < 32 ? 1u << dev : 0u;
    if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return;
    int optin = 0;
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cudaFuncAttributes attr{};
    DBRX_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    DBRX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         optin - static_cast<int>(attr.sharedSizeBytes)));
    done.fetch_or(bit, std::memory_order_release);
}

void set_device(int device) { DBRX_CUDA_CHECK(cudaSetDevice(device)); }

}  // namespace dbrx::cuda
