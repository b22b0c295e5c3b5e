// Error checks and RAII owners for CUDA resources. Every failure becomes a dbrx::Error that names
// the call and where it happened; out-of-memory becomes DBRX_ERR_OUT_OF_MEMORY.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "util/error.h"

namespace dbrx::cuda {

[[noreturn]] void throw_cuda(cudaError_t err, const char *what, const char *file, int line);
[[noreturn]] void throw_cublas(cublasStatus_t st, const char *what, const char *file, int line);

#define DBRX_CUDA_CHECK(call)                                                            \
    do {                                                                                 \
        cudaError_t dbrx_err_ = (call);                                                  \
        if (dbrx_err_ != cudaSuccess) ::dbrx::cuda::throw_cuda(dbrx_err_, #call, __FILE__, __LINE__); \
    } while (0)
#define DBRX_CUBLAS_CHECK(call)                                                          \
    do {                                                                                 \
        cublasStatus_t dbrx_st_ = (call);                                                \
        if (dbrx_st_ != CUBLAS_STATUS_SUCCESS) ::dbrx::cuda::throw_cublas(dbrx_st_, #call, __FILE__, __LINE__); \
    } while (0)
// After a kernel launch: configuration errors surface here, not at the next sync.
#define DBRX_CUDA_LAUNCH_CHECK() DBRX_CUDA_CHECK(cudaGetLastError())

// Move-only owner of one CUDA allocation that Release::deallocate gives back (device or pinned host
// memory); the derived buffers below allocate.
template <class Release> class CudaAllocation {
public:
    CudaAllocation() = default;
    ~CudaAllocation() {
        if (ptr_) Release::deallocate(ptr_);
    }
    CudaAllocation(CudaAllocation &&o) noexcept
        : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
    CudaAllocation &operator=(CudaAllocation &&o) noexcept {
        if (this != &o) {
            if (ptr_) Release::deallocate(ptr_);
            ptr_ = std::exchange(o.ptr_, nullptr);
            bytes_ = std::exchange(o.bytes_, 0);
        }
        return *this;
    }
    CudaAllocation(const CudaAllocation &) = delete;
    CudaAllocation &operator=(const CudaAllocation &) = delete;

    void *get() const { return ptr_; }
    template <class T> T *as() const { return static_cast<T *>(ptr_); }
    size_t bytes() const { return bytes_; }

protected:
    // Frees the allocation before a larger one replaces it (contents are not kept).
    void release() {
        if (ptr_) Release::deallocate(std::exchange(ptr_, nullptr));
        bytes_ = 0;
    }

    void *ptr_ = nullptr;
    size_t bytes_ = 0;
};

struct DeviceFree {
    static void deallocate(void *p) { cudaFree(p); }
};
struct PinnedFree {
    static void deallocate(void *p) { cudaFreeHost(p); }
};

// Device memory from cudaMalloc (plain allocations; never managed memory).
class DeviceBuffer : public CudaAllocation<DeviceFree> {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes, const char *what = "device buffer");
    // Grows (never shrinks) to at least `bytes`; contents are not kept.
    void reserve(size_t bytes, const char *what = "device buffer");
};

// How many times a DeviceBuffer on `device` has (re)allocated so far. Device addresses captured in a
// CUDA graph stay valid while this count is unchanged: a buffer moves only when reserve() grows it.
uint64_t device_allocation_epoch(int device);

// Page-locked host memory (staging for uploads and the per-step metadata).
class PinnedBuffer : public CudaAllocation<PinnedFree> {
public:
    PinnedBuffer() = default;
    explicit PinnedBuffer(size_t bytes);
    // Grows (never shrinks) to at least `bytes`; contents are not kept.
    void reserve(size_t bytes);
};

// Per-stream state kept by other code (the decode attention's merge counters) is released through
// these hooks just before a Stream destroys its handle, so a new stream that gets the same handle
// value never inherits it. Hooks run on the destroying thread and must not throw.
using StreamRetireHook = void (*)(cudaStream_t);
void add_stream_retire_hook(StreamRetireHook hook);

class Stream {
public:
    Stream();
    ~Stream();
    Stream(const Stream &) = delete;
    Stream &operator=(const Stream &) = delete;
    cudaStream_t get() const { return s_; }

private:
    cudaStream_t s_ = nullptr;
};

class CublasHandle {
public:
    explicit CublasHandle(cudaStream_t stream);
    ~CublasHandle();
    CublasHandle(const CublasHandle &) = delete;
    CublasHandle &operator=(const CublasHandle &) = delete;
    cublasHandle_t get() const { return h_; }

private:
    cublasHandle_t h_ = nullptr;
};

// Lets `kernel` use the device's whole opt-in shared memory for dynamic allocations, once per device
// (`done` holds one bit per device; the attribute call would otherwise cost host time on every launch).
void allow_max_dynamic_smem(const void *kernel, std::atomic<uint32_t> &done);

// Makes `device` current on the calling thread (the engine may call from any thread).
void set_device(int device);

}  // namespace dbrx::cuda
