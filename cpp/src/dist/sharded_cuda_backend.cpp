#include "dist/sharded_cuda_backend.h"

#include "util/error.h"

#ifdef DBRX_WITH_CUDA

#include <algorithm>
#include <array>
#include <cstdio>
#include <exception>
#include <map>
#include <mutex>

#include "backend/cuda/cuda_backend.h"
#include "dist/cuda_rank.h"
#include "dist/rank_threads.h"
#include "dist/shard_plan.h"
#include "dist/thread_communicator.h"
#include "model/validate.h"
#ifdef DBRX_WITH_NCCL
#include "dist/nccl_communicator.h"
#endif

namespace dbrx::dist {
namespace {

std::string num(int64_t v) { return std::to_string(v); }

// The CUDA attention kernels map query head i of a rank to its KV head i / (nq / nkv): right when
// each rank's query heads cover whole KV groups, or lie inside one group.
void check_cuda_plan(const ShardPlan &plan) {
    const std::string where = "sharded CUDA backend (" + plan.describe() + "): ";
    if (plan.attention_ranks != plan.world_size)
        fail(DBRX_ERR_UNSUPPORTED, where + "more ranks than the model's " + num(plan.n_heads) +
                                       " query heads; choose tp * ep <= n_heads");
    const int32_t per = plan.n_heads / plan.attention_ranks, group = plan.n_heads / plan.n_kv_heads;
    if (per % group != 0 && group % per != 0)
        fail(DBRX_ERR_UNSUPPORTED, where + num(per) + " query heads per rank split the groups of " + num(group) +
                                       " query heads sharing a KV head unevenly; choose tp * ep dividing " +
                                       num(plan.n_kv_heads) + " or a multiple of " + num(plan.n_heads / group));
}

// One KV pool per rank, on the rank's GPU, holding the rank's KV heads.
class ShardedCudaKvPool final : public KvPool {
public:
    ShardedCudaKvPool(std::vector<std::unique_ptr<KvPool>> ranks, int32_t n_blocks, int32_t block_size)
        : ranks_(std::move(ranks)), n_blocks_(n_blocks), block_size_(block_size) {}
    int32_t n_blocks() const override { return n_blocks_; }
    int32_t block_size() const override { return block_size_; }
    KvPool &rank(size_t i) { return *ranks_[i]; }
    size_t size() const { return ranks_.size(); }

private:
    std::vector<std::unique_ptr<KvPool>> ranks_;
    int32_t n_blocks_, block_size_;
};

struct Rank {
    int32_t rank = 0, device = 0;
    std::unique_ptr<cuda::CudaBackend> backend;  // destroyed last: the hooks read its model
    std::unique_ptr<RankReduce> reduce;
    std::unique_ptr<CudaRank> hooks;
    // Graph bookkeeping (NCCL demands that every rank capture the same collectives): the rank's
    // device allocation epoch after its last step, and its graph counts then.
    uint64_t epoch = 0;
    cuda::GraphStats graphs;
};

// progress of rank i of n as a fraction of the whole load.
struct ScaledProgress {
    bool (*fn)(float, void *);
    void *user;
    float base, scale;
    static bool call(float f, void *self) {
        auto *p = static_cast<ScaledProgress *>(self);
        return p->fn(p->base + p->scale * f, p->user);
    }
};

using ModelFactory = std::function<std::unique_ptr<cuda::DeviceModel>(const ShardPlan &, int32_t rank, int32_t local)>;

class ShardedCuda final : public ShardedCudaBackend {
public:
    ShardedCuda(const ModelConfig &global, int32_t tp, int32_t ep, ShardedCudaOptions options,
                const ModelFactory &make_model)
        : cfg_(global),
          plan_(ShardPlan::make(global, tp, ep)),
          options_(std::move(options)),
          workers_(std::max<size_t>(1, options_.devices.size())) {
        check_cuda_plan(plan_);
        const std::vector<int32_t> &devs = options_.devices;
        const int32_t local = static_cast<int32_t>(devs.size());
        if (local == 0) invalid_argument("sharded CUDA backend: no devices given");
        int visible = 0;
        if (cudaGetDeviceCount(&visible) != cudaSuccess) {
            cudaGetLastError();
            visible = 0;
        }
        for (int32_t d : devs)
            if (d < 0 || d >= visible)
                fail(DBRX_ERR_UNSUPPORTED, "sharded CUDA backend: device " + num(d) + " requested but " +
                                               num(visible) + " CUDA device(s) visible");
        if (options_.transport == CudaTransport::Host) {
            if (local != plan_.world_size)
                invalid_argument("sharded CUDA backend: tp * ep = " + num(plan_.world_size) + " ranks but " +
                                 num(local) + " devices given (the host transport runs one process)");
            for (auto &c : ThreadCommunicator::create_group(local, options_.timeout)) comms_.push_back(std::move(c));
        } else {
            std::vector<int32_t> sorted = devs;
            std::sort(sorted.begin(), sorted.end());
            if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
                invalid_argument("sharded CUDA backend: a device appears twice in the list; NCCL runs one rank per GPU");
#ifdef DBRX_WITH_NCCL
            for (auto &c : NcclCommunicator::create_local(options_.rendezvous, devs, options_.timeout))
                comms_.push_back(std::move(c));
#else
            fail(DBRX_ERR_UNSUPPORTED, "this build has no NCCL (nccl.h / libnccl were not found): multi-GPU runs need it");
#endif
            if (comms_[0]->size() != plan_.world_size)
                invalid_argument("sharded CUDA backend: tp * ep = " + num(plan_.world_size) + " ranks but the " +
                                 num(comms_[0]->size() / local) + " process(es) drive " + num(comms_[0]->size()) +
                                 " GPUs in all (" + num(local) + " each)");
        }
        const int32_t base = comms_[0]->rank();
        for (int32_t i = 0; i < local; ++i) {
            Rank r;
            r.rank = base + i;
            r.device = devs[i];
            cuda::set_device(r.device);
            r.backend = cuda::make_cuda_backend_from(make_model(plan_, r.rank, i), r.device);
            r.reduce = options_.transport == CudaTransport::Host ? make_host_reduce(*comms_[i])
                                                                 : make_nccl_reduce(*comms_[i], r.backend->stream());
            r.hooks = std::make_unique<CudaRank>(cfg_, plan_, r.rank, r.backend->model(), *r.reduce,
                                                 options_.before_layer);
            r.backend->set_rank_hooks(r.hooks.get());
            ranks_.push_back(std::move(r));
        }
    }

    // Each rank's CUDA objects (cuBLAS handle, stream, buffers) are released with its GPU current.
    ~ShardedCuda() override {
        for (Rank &r : ranks_) {
            cudaSetDevice(r.device);
            r.hooks.reset();
            r.reduce.reset();
            r.backend.reset();
        }
    }

    std::string name() const override {
        return "cuda-sharded(tp " + num(plan_.tp) + ", ep " + num(plan_.ep) + ", " +
               (options_.transport == CudaTransport::Nccl ? "nccl" : "host") + ")";
    }
    int32_t world_size() const override { return plan_.world_size; }
    // Without mutex_: a forward holds it while its ranks wait in the collectives this fails.
    void abort(const std::string &reason) noexcept override {
        for (auto &c : comms_) c->abort(reason);
    }

    // Per rank: blocks must fit on every rank, so the largest rank block against the least room.
    int64_t kv_bytes_per_block(int32_t block_size) const override {
        int64_t b = 0;
        for (const Rank &r : ranks_) b = std::max(b, r.backend->kv_bytes_per_block(block_size));
        return b;
    }
    int64_t kv_memory_available() const override {
        std::map<int32_t, int32_t> sharing;
        for (const Rank &r : ranks_) ++sharing[r.device];
        int64_t least = INT64_MAX;
        for (const Rank &r : ranks_) least = std::min(least, r.backend->kv_memory_available() / sharing[r.device]);
        return least;
    }

    std::unique_ptr<KvPool> create_kv_pool(int32_t n_blocks, int32_t block_size) override {
        std::lock_guard<std::mutex> lock(mutex_);
        std::vector<std::unique_ptr<KvPool>> pools;
        for (Rank &r : ranks_) pools.push_back(r.backend->create_kv_pool(n_blocks, block_size));
        kv_blocks_ = n_blocks;
        kv_block_size_ = block_size;
        return std::make_unique<ShardedCudaKvPool>(std::move(pools), n_blocks, block_size);
    }

    void forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) override;

    void set_collective_timing(bool on) override {
        std::lock_guard<std::mutex> lock(mutex_);
        for (Rank &r : ranks_) r.hooks->set_timing(on);
    }
    void set_cuda_graphs(bool on) override {
        std::lock_guard<std::mutex> lock(mutex_);
        for (Rank &r : ranks_) {
            cuda::set_device(r.device);
            r.backend->set_cuda_graphs(on);
        }
    }

    std::vector<CudaRankStats> rank_stats() override {
        std::lock_guard<std::mutex> lock(mutex_);
        std::map<int32_t, int32_t> sharing;
        for (const Rank &r : ranks_) ++sharing[r.device];
        std::vector<CudaRankStats> out;
        for (Rank &r : ranks_) {
            CudaRankStats s;
            s.rank = r.rank;
            s.device = r.device;
            s.weight_bytes = r.backend->model().bytes;
            s.kv_bytes = kv_blocks_ > 0 ? r.backend->kv_bytes_per_block(kv_block_size_) * kv_blocks_ : 0;
            cuda::set_device(r.device);
            size_t free_b = 0, total_b = 0;
            DBRX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
            // Everything else on the GPU (activations, cuBLAS / NCCL buffers, the CUDA context), shared
            // evenly between the ranks on one GPU.
            const int64_t used = static_cast<int64_t>(total_b - free_b) / sharing[r.device];
            s.workspace_bytes = std::max<int64_t>(0, used - s.weight_bytes - s.kv_bytes);
            const CollectiveTime t = r.hooks->take_timing();
            s.collective_ms = t.ms;
            s.collectives = t.calls;
            const cuda::GraphStats g = r.backend->graph_stats();
            s.graph_replays = g.replays;
            s.graph_captures = g.captures;
            out.push_back(s);
        }
        return out;
    }

private:
    const ModelConfig cfg_;
    const ShardPlan plan_;
    const ShardedCudaOptions options_;
    std::vector<std::unique_ptr<Communicator>> comms_;  // declared before ranks_: outlives their reducers
    std::vector<Rank> ranks_;
    // Before a step: if anything else allocated on a rank's GPU since the last step (another
    // backend, the KV pools), that rank alone would drop its graphs and run eagerly while the others
    // replay, and NCCL requires captured collectives to be captured on every rank. So every rank
    // drops them together. Within a step only the rank's own thread allocates on its GPU, alike on all.
    void align_graphs();
    // After a step: ranks whose graph counts moved differently ran their collectives captured on
    // some ranks only; graphs go off for the group (reported once) rather than risk it again.
    void check_graphs();

    std::mutex mutex_;
    std::string dead_;  // why the group failed; empty while healthy (guarded by mutex_)
    int32_t kv_blocks_ = 0, kv_block_size_ = 0;
    // Local rank i >= 1 runs on its own thread, the same on every step: a CUDA graph is captured and
    // replayed there. No rank relies on thread-local state beyond the current device, which
    // compute_logits sets on every step. Its idle threads are joined when the backend goes (never
    // during a forward: that holds mutex_).
    RankWorkers workers_;
};

void ShardedCuda::align_graphs() {
    bool moved = false;
    for (const Rank &r : ranks_) moved = moved || cuda::device_allocation_epoch(r.device) != r.epoch;
    if (!moved) return;
    for (Rank &r : ranks_) {
        cuda::set_device(r.device);
        const bool on = r.backend->cuda_graphs();
        r.backend->set_cuda_graphs(false);  // drops the graphs and the shapes seen
        r.backend->set_cuda_graphs(on);
    }
}

void ShardedCuda::check_graphs() {
    bool diverged = false;
    std::vector<cuda::GraphStats> now;
    for (Rank &r : ranks_) {
        now.push_back(r.backend->graph_stats());
        r.epoch = cuda::device_allocation_epoch(r.device);
    }
    auto delta = [&](size_t i) {
        const cuda::GraphStats &a = now[i], &b = ranks_[i].graphs;
        return std::array<int64_t, 3>{a.replays - b.replays, a.captures - b.captures, a.eager - b.eager};
    };
    for (size_t i = 1; i < ranks_.size(); ++i) diverged = diverged || delta(i) != delta(0);
    for (size_t i = 0; i < ranks_.size(); ++i) ranks_[i].graphs = now[i];
    if (!diverged) return;
    std::fprintf(stderr, "dbrx: %s: the ranks' CUDA graphs diverged (a capture failed on some ranks only); decode "
                         "steps run without graphs from now on\n", name().c_str());
    for (Rank &r : ranks_) {
        cuda::set_device(r.device);
        r.backend->set_cuda_graphs(false);
        r.graphs = r.backend->graph_stats();
    }
}

void ShardedCuda::forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!dead_.empty()) fail(DBRX_ERR_ENGINE_DEAD, name() + " failed earlier and cannot run: " + dead_);
    auto *kv = dynamic_cast<ShardedCudaKvPool *>(&pool);
    if (!kv || kv->size() != ranks_.size())
        invalid_argument(name() + " forward: the KV pool was not created by this backend");
    // Bad input fails this batch only: checked here, before any rank could stop half-way.
    check_forward_steps(cfg_, batch, *kv, logits, name());

    align_graphs();

    // Each local rank on its own thread, the same on every step (rank_threads.h: the first failure
    // is the root cause).
    const std::string failure = workers_.run(
        [&](size_t i) {
            Rank &r = ranks_[i];
            auto *rank_pool = dynamic_cast<cuda::CudaKvPool *>(&kv->rank(i));
            if (!rank_pool) fail(DBRX_ERR_INTERNAL, "rank KV pool is not a CUDA pool");
            // The rank's backend is driven only from here, under mutex_: compute_logits needs no lock
            // of its own. It enqueues the whole step (collectives included, a CUDA graph for decodes)
            // without waiting; finish_step waits once, with the communicator's timeout.
            const int32_t n = r.backend->compute_logits(*rank_pool, batch);
            r.reduce->finish_step(r.backend->stream());
            // Every rank holds the gathered logits; the first hands them out (its stream is idle now).
            if (i == 0 && n > 0)
                DBRX_CUDA_CHECK(cudaMemcpy(logits, r.backend->device_logits(),
                                           sizeof(float) * n * static_cast<size_t>(cfg_.vocab_size),
                                           cudaMemcpyDeviceToHost));
        },
        [&](size_t i) { return "rank " + num(ranks_[i].rank) + " (GPU " + num(ranks_[i].device) + ")"; },
        [&](size_t i, const std::string &why) { ranks_[i].reduce->communicator().abort(why); });
    if (!failure.empty()) {
        dead_ = failure;
        fail(DBRX_ERR_ENGINE_DEAD, name() + ": " + failure);
    }
    check_graphs();
}

}  // namespace

std::unique_ptr<ShardedCudaBackend> make_sharded_cuda_backend(const Checkpoint &ckpt, int32_t tp, int32_t ep,
                                                              const ShardedCudaOptions &options,
                                                              bool (*progress)(float, void *), void *progress_user) {
    check_backend_config(ckpt.config(), static_cast<int64_t>(ckpt.weights().layers.size()), "sharded CUDA backend");
    const float n = static_cast<float>(std::max<size_t>(1, options.devices.size()));
    auto make_model = [&](const ShardPlan &plan, int32_t rank, int32_t local) {
        ScaledProgress p{progress, progress_user, static_cast<float>(local) / n, 1.f / n};
        return cuda::upload_model_shard(ckpt, plan, rank, progress ? &ScaledProgress::call : nullptr, &p);
    };
    return std::make_unique<ShardedCuda>(ckpt.config(), tp, ep, options, make_model);
}

std::unique_ptr<ShardedCudaBackend> make_synthetic_sharded_cuda_backend(const ModelConfig &config, int32_t tp,
                                                                        int32_t ep, const ShardedCudaOptions &options,
                                                                        uint64_t seed) {
    auto make_model = [&](const ShardPlan &plan, int32_t rank, int32_t) {
        return cuda::synthetic_model_shard(config, plan, rank, seed);
    };
    return std::make_unique<ShardedCuda>(config, tp, ep, options, make_model);
}

std::unique_ptr<Backend> make_parallel_cuda_backend(const Checkpoint &ckpt, const BackendOptions &options,
                                                    const std::vector<int32_t> &devices,
                                                    const RendezvousConfig &rendezvous,
                                                    bool (*progress)(float, void *), void *progress_user) {
    const int64_t world = int64_t{options.tp} * options.ep;
    if (world == 1) {
        if (devices.size() > 1)
            invalid_argument("CUDA: " + num(static_cast<int64_t>(devices.size())) +
                             " devices given for tp * ep = 1 (one rank runs on one GPU)");
        BackendOptions one = options;
        if (!devices.empty()) one.device_id = devices[0];
        return make_cuda_backend(ckpt, one, progress, progress_user);
    }
    if (options.batch_invariant)
        fail(DBRX_ERR_UNSUPPORTED, "batch_invariant is not available with tensor_parallel * expert_parallel = " +
                                       num(world) + " on CUDA (the ranks' all-reduces sum in a fixed order, but the "
                                       "rank kernels are the batch-dependent ones)");
    ShardedCudaOptions sharded;
    sharded.rendezvous = rendezvous;
    sharded.devices = devices;
    if (sharded.devices.empty()) {
        // Consecutive GPUs from device_id: this process's share of the tp * ep ranks.
        const RendezvousConfig resolved = resolve_rendezvous(rendezvous);
        if (world % resolved.world_size != 0)
            invalid_argument("CUDA: tp * ep = " + num(world) + " ranks cannot be split evenly over " +
                             num(resolved.world_size) + " processes");
        for (int64_t i = 0; i < world / resolved.world_size; ++i)
            sharded.devices.push_back(options.device_id + static_cast<int32_t>(i));
    }
    return make_sharded_cuda_backend(ckpt, options.tp, options.ep, sharded, progress, progress_user);
}

}  // namespace dbrx::dist

#else  // no CUDA in this build

namespace dbrx::dist {

namespace {
[[noreturn]] void no_cuda() {
    fail(DBRX_ERR_UNSUPPORTED, "the sharded CUDA backend needs a build with CUDA (-DDBRX_CUDA=ON)");
}
}  // namespace

std::unique_ptr<ShardedCudaBackend> make_sharded_cuda_backend(const Checkpoint &, int32_t, int32_t,
                                                              const ShardedCudaOptions &, bool (*)(float, void *),
                                                              void *) {
    no_cuda();
}
std::unique_ptr<ShardedCudaBackend> make_synthetic_sharded_cuda_backend(const ModelConfig &, int32_t, int32_t,
                                                                        const ShardedCudaOptions &, uint64_t) {
    no_cuda();
}
std::unique_ptr<Backend> make_parallel_cuda_backend(const Checkpoint &ckpt, const BackendOptions &options,
                                                    const std::vector<int32_t> &, const RendezvousConfig &,
                                                    bool (*progress)(float, void *), void *progress_user) {
    if (int64_t{options.tp} * options.ep == 1) return make_cuda_backend(ckpt, options, progress, progress_user);
    no_cuda();
}

}  // namespace dbrx::dist

#endif
