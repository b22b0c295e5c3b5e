// Built only with CUDA and NCCL (CMakeLists.txt leaves this file out otherwise).
#include "dist/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <thread>

#include "util/error.h"

namespace dbrx::dist {

struct LocalAbort {
    std::mutex mutex;
    bool aborted = false;
    std::string reason;
};

struct NcclCommunicator::Handle {
    ncclComm_t comm = nullptr;
    bool dead = false;        // ncclCommAbort has run
    std::mutex call;          // held by the thread inside a collective
    // Only reached with a live comm when a constructor failed half-way.
    ~Handle() {
        if (comm && !dead) ncclCommAbort(comm);
    }
};

namespace {

using Clock = std::chrono::steady_clock;

std::string num(int64_t v) { return std::to_string(v); }

cudaStream_t as_stream(void *s) { return static_cast<cudaStream_t>(s); }

void check_cuda(cudaError_t e, const std::string &what) {
    if (e != cudaSuccess) fail(DBRX_ERR_ENGINE_DEAD, what + ": " + cudaGetErrorString(e));
}

// Polling back-off: spin for `spin` (collectives of a decode step take microseconds; a whole step a
// few milliseconds, whose end a sleep would overshoot), then sleep.
void back_off(Clock::time_point start, std::chrono::microseconds spin = std::chrono::microseconds(200)) {
    if (Clock::now() - start < spin) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(50));
}

bool pending(ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; }

}  // namespace

NcclCommunicator::NcclCommunicator(std::unique_ptr<Handle> comm, int32_t rank, int32_t size, int32_t device,
                                   std::chrono::milliseconds timeout, std::shared_ptr<LocalAbort> local)
    : comm_(std::move(comm)), rank_(rank), size_(size), device_(device), timeout_(timeout), local_(std::move(local)) {
    const std::string where = "NCCL communicator rank " + num(rank) + " on device " + num(device);
    check_cuda(cudaSetDevice(device), where + ": cudaSetDevice");
    cudaStream_t s = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), where + ": cudaStreamCreate");
    own_stream_ = stream_ = s;
    check_cuda(cudaMalloc(reinterpret_cast<void **>(&scratch_), sizeof(float)), where + ": cudaMalloc");
}

NcclCommunicator::~NcclCommunicator() {
    cudaSetDevice(device_);
    if (comm_ && comm_->comm) {
        std::lock_guard<std::mutex> lock(comm_->call);
        bool clean = !comm_->dead && !aborted();
        if (clean) {
            // Flush outstanding work; a peer that is gone must not hold up the shutdown either.
            ncclResult_t r = ncclCommFinalize(comm_->comm), async = ncclInProgress;
            const auto deadline = Clock::now() + timeout_, start = Clock::now();
            while (pending(r) && Clock::now() < deadline) {
                if (ncclCommGetAsyncError(comm_->comm, &async) != ncclSuccess || async != ncclInProgress) break;
                back_off(start);
            }
            clean = pending(r) && async == ncclSuccess;
        }
        if (clean) ncclCommDestroy(comm_->comm);
        else if (!comm_->dead) ncclCommAbort(comm_->comm);
        comm_->comm = nullptr;
    }
    if (scratch_) cudaFree(scratch_);
    if (own_stream_) cudaStreamDestroy(as_stream(own_stream_));
}

bool NcclCommunicator::aborted() const {
    std::lock_guard<std::mutex> lock(local_->mutex);
    return local_->aborted;
}

void NcclCommunicator::abort(const std::string &reason) noexcept {
    try {
        std::lock_guard<std::mutex> lock(local_->mutex);
        if (!local_->aborted) {
            local_->aborted = true;
            local_->reason = "rank " + num(rank_) + " aborted: " + reason;
        }
    } catch (...) {
        std::lock_guard<std::mutex> lock(local_->mutex);
        local_->aborted = true;
    }
    // Abort the NCCL communicator now unless a collective is polling it: that thread sees the flag
    // within microseconds and aborts it itself (NCCL calls on one communicator must not overlap).
    std::unique_lock<std::mutex> call(comm_->call, std::try_to_lock);
    if (call.owns_lock() && !comm_->dead) {
        ncclCommAbort(comm_->comm);
        comm_->dead = true;
    }
}

void NcclCommunicator::die(const std::string &why) {
    std::string reason;
    {
        std::lock_guard<std::mutex> lock(local_->mutex);
        if (!local_->aborted) {
            local_->aborted = true;
            local_->reason = "rank " + num(rank_) + ": " + why;
        }
        reason = local_->reason;
    }
    if (!comm_->dead) {
        ncclCommAbort(comm_->comm);
        comm_->dead = true;
    }
    fail(DBRX_ERR_ENGINE_DEAD, "NCCL communicator (rank " + num(rank_) + " of " + num(size_) + ", device " +
                                   num(device_) + "): group failed: " + reason);
}

void NcclCommunicator::complete(const char *what, int result, bool wait_stream) {
    const auto start = Clock::now(), deadline = start + timeout_;
    auto r = static_cast<ncclResult_t>(result);
    if (!pending(r))
        die(std::string(what) + " failed: " + ncclGetErrorString(r) + " (" + ncclGetLastError(comm_->comm) + ")");
    for (;;) {
        if (aborted()) die(std::string(what) + " interrupted by an abort");
        ncclResult_t async = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(comm_->comm, &async);
        if (q != ncclSuccess) async = q;
        if (!pending(async))
            die(std::string(what) + " failed: " + ncclGetErrorString(async) + " (" + ncclGetLastError(comm_->comm) + ")");
        if (async == ncclSuccess) {  // enqueued; now wait for the stream
            if (!wait_stream) return;
            cudaError_t s = cudaStreamQuery(as_stream(stream_));
            if (s == cudaSuccess) return;
            if (s != cudaErrorNotReady) die(std::string(what) + ": CUDA error " + cudaGetErrorString(s));
        }
        if (Clock::now() > deadline)
            die(std::string(what) + " timed out after " + num(timeout_.count()) +
                " ms (a peer rank is dead, stalled or calling collectives out of step)");
        back_off(start, wait_stream ? std::chrono::microseconds(50000) : std::chrono::microseconds(200));
    }
}

void NcclCommunicator::all_reduce_sum(float *data, int64_t n) {
    std::lock_guard<std::mutex> lock(comm_->call);
    if (aborted()) die("all_reduce_sum after an abort");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    complete("all_reduce_sum",
             ncclAllReduce(data, data, static_cast<size_t>(n), ncclFloat32, ncclSum, comm_->comm, as_stream(stream_)));
}

void NcclCommunicator::enqueue_all_reduce_sum(float *data, int64_t n) {
    std::lock_guard<std::mutex> lock(comm_->call);
    if (aborted()) die("all_reduce_sum after an abort");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    complete("all_reduce_sum",
             ncclAllReduce(data, data, static_cast<size_t>(n), ncclFloat32, ncclSum, comm_->comm, as_stream(stream_)),
             false);
}

void NcclCommunicator::enqueue_all_gather(const float *send, int64_t n, float *recv) {
    std::lock_guard<std::mutex> lock(comm_->call);
    if (aborted()) die("all_gather after an abort");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    complete("all_gather", ncclAllGather(send, recv, static_cast<size_t>(n), ncclFloat32, comm_->comm, as_stream(stream_)),
             false);
}

void NcclCommunicator::finish_step() {
    std::lock_guard<std::mutex> lock(comm_->call);
    if (aborted()) die("step interrupted by an abort");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    complete("step", ncclSuccess);
}

void NcclCommunicator::all_gather(const float *send, int64_t n, float *recv) {
    std::lock_guard<std::mutex> lock(comm_->call);
    if (aborted()) die("all_gather after an abort");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    complete("all_gather",
             ncclAllGather(send, recv, static_cast<size_t>(n), ncclFloat32, comm_->comm, as_stream(stream_)));
}

void NcclCommunicator::all_to_all_v(const float *send, std::span<const int64_t> send_counts, float *recv,
                                    std::span<const int64_t> recv_counts) {
    if (static_cast<int32_t>(send_counts.size()) != size_ || static_cast<int32_t>(recv_counts.size()) != size_) {
        abort("all_to_all_v: count arrays must have one entry per rank");
        invalid_argument("NCCL all_to_all_v: count arrays must have " + num(size_) + " entries");
    }
    std::lock_guard<std::mutex> lock(comm_->call);
    if (aborted()) die("all_to_all_v after an abort");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    // Point-to-point pairs fused in one group: NCCL schedules them together, without deadlock.
    ncclResult_t first = ncclGroupStart();
    int64_t send_off = 0, recv_off = 0;
    for (int32_t p = 0; p < size_; ++p) {
        if (send_counts[p] > 0) {
            ncclResult_t r = ncclSend(send + send_off, static_cast<size_t>(send_counts[p]), ncclFloat32, p,
                                      comm_->comm, as_stream(stream_));
            if (!pending(r) && pending(first)) first = r;
        }
        if (recv_counts[p] > 0) {
            ncclResult_t r = ncclRecv(recv + recv_off, static_cast<size_t>(recv_counts[p]), ncclFloat32, p,
                                      comm_->comm, as_stream(stream_));
            if (!pending(r) && pending(first)) first = r;
        }
        send_off += send_counts[p];
        recv_off += recv_counts[p];
    }
    ncclResult_t end = ncclGroupEnd();
    complete("all_to_all_v", pending(first) ? end : first);
}

void NcclCommunicator::barrier() {
    std::lock_guard<std::mutex> lock(comm_->call);
    if (aborted()) die("barrier after an abort");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    complete("barrier", ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_->comm, as_stream(stream_)));
}

std::vector<std::unique_ptr<NcclCommunicator>> NcclCommunicator::create_local(const RendezvousConfig &rendezvous,
                                                                              std::span<const int32_t> devices,
                                                                              std::chrono::milliseconds timeout) {
    if (devices.empty()) invalid_argument("NCCL: no devices given");
    if (timeout.count() <= 0) invalid_argument("NCCL: timeout must be positive");
    int visible = 0;
    if (cudaGetDeviceCount(&visible) != cudaSuccess) visible = 0;
    for (int32_t d : devices)
        if (d < 0 || d >= visible)
            fail(DBRX_ERR_UNSUPPORTED, "NCCL: device " + num(d) + " requested but " + num(visible) + " CUDA device(s) visible");
    const RendezvousConfig rdv = resolve_rendezvous(rendezvous);
    const int32_t local = static_cast<int32_t>(devices.size()), world = rdv.world_size * local;

    // The blob: the unique id, then process 0's GPU count (every process must drive as many).
    ncclUniqueId id{};
    std::vector<uint8_t> blob(sizeof id + 4);
    if (rdv.rank == 0) {
        ncclResult_t r = ncclGetUniqueId(&id);
        if (r != ncclSuccess) fail(DBRX_ERR_ENGINE_DEAD, std::string("NCCL: ncclGetUniqueId: ") + ncclGetErrorString(r));
        std::memcpy(blob.data(), &id, sizeof id);
        std::memcpy(blob.data() + sizeof id, &local, 4);
    }
    blob = rendezvous_exchange(rdv, blob);
    int32_t local0 = 0;
    if (blob.size() != sizeof id + 4) fail(DBRX_ERR_IO, "NCCL: the rendezvous returned a malformed unique id");
    std::memcpy(&id, blob.data(), sizeof id);
    std::memcpy(&local0, blob.data() + sizeof id, 4);
    if (local0 != local)
        invalid_argument("NCCL: process 0 drives " + num(local0) + " GPUs, process " + num(rdv.rank) + " drives " +
                         num(local) + "; every process must drive the same number");

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    std::vector<ncclComm_t> comms(static_cast<size_t>(local), nullptr);
    ncclResult_t first = ncclGroupStart();
    for (int32_t i = 0; i < local; ++i) {
        check_cuda(cudaSetDevice(devices[i]), "NCCL init: cudaSetDevice");
        ncclResult_t r = ncclCommInitRankConfig(&comms[i], world, id, rdv.rank * local + i, &config);
        if (!pending(r) && pending(first)) first = r;
    }
    ncclResult_t end = ncclGroupEnd();
    if (pending(first)) first = end;
    const std::string ranks = "ranks " + num(rdv.rank * local) + ".." + num(rdv.rank * local + local - 1) + " of " + num(world);
    auto abort_all = [&](const std::string &why) {
        for (ncclComm_t c : comms)
            if (c) ncclCommAbort(c);
        fail(DBRX_ERR_ENGINE_DEAD, "NCCL init of " + ranks + ": " + why);
    };
    // ncclGetLastError holds NCCL's own explanation (e.g. two ranks on one device).
    auto explain = [](ncclResult_t r) { return std::string(ncclGetErrorString(r)) + ": " + ncclGetLastError(nullptr); };
    if (!pending(first)) abort_all(explain(first));
    const auto start = Clock::now(), deadline = start + timeout;
    for (int32_t i = 0; i < local; ++i) {
        ncclResult_t async = ncclInProgress;
        while (async == ncclInProgress) {
            if (ncclCommGetAsyncError(comms[i], &async) != ncclSuccess) async = ncclInternalError;
            if (async == ncclInProgress && Clock::now() > deadline)
                abort_all("timed out after " + num(timeout.count()) + " ms waiting for the other ranks");
            if (async == ncclInProgress) back_off(start);
        }
        if (async != ncclSuccess) abort_all(explain(async));
    }

    auto shared = std::make_shared<LocalAbort>();
    std::vector<std::unique_ptr<NcclCommunicator>> out;
    try {
        for (int32_t i = 0; i < local; ++i) {
            auto h = std::make_unique<Handle>();
            h->comm = comms[i];
            comms[i] = nullptr;  // owned by the handle from here on
            std::unique_ptr<NcclCommunicator> c(
                new NcclCommunicator(std::move(h), rdv.rank * local + i, world, devices[i], timeout, shared));
            out.push_back(std::move(c));
        }
    } catch (...) {
        for (ncclComm_t c : comms)
            if (c) ncclCommAbort(c);
        throw;
    }
    return out;
}

}  // namespace dbrx::dist
