#include "dist/sharded_cpu_backend.h"

#include <algorithm>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend/cpu/cpu_kv_pool.h"
#include "dist/cpu_rank.h"
#include "dist/rank_threads.h"
#include "dist/shard_plan.h"
#include "dist/thread_communicator.h"
#include "model/validate.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

using cpu::CpuKvPool;
using cpu::kCpuKvMemory;  // all ranks share the host's memory

// One KV pool per rank, each holding that rank's KV heads (none on ranks without attention).
class ShardedKvPool final : public KvPool {
public:
    ShardedKvPool(const ModelConfig &c, const ShardPlan &plan, int32_t n_blocks, int32_t block_size)
        : n_blocks_(n_blocks), block_size_(block_size) {
        if (n_blocks <= 0 || block_size <= 0)
            invalid_argument("sharded CPU KV pool: n_blocks (" + std::to_string(n_blocks) + ") and block_size (" +
                             std::to_string(block_size) + ") must be positive");
        for (int32_t r = 0; r < plan.world_size; ++r) {
            const int32_t heads = plan.shard(r).kv_heads.size();
            ranks_.push_back(heads == 0 ? nullptr
                                        : std::make_unique<CpuKvPool>(c.n_layers, n_blocks, block_size, heads,
                                                                      c.head_dim));
        }
    }
    int32_t n_blocks() const override { return n_blocks_; }
    int32_t block_size() const override { return block_size_; }
    CpuKvPool *rank(int32_t r) { return ranks_[r].get(); }
    int32_t world_size() const { return static_cast<int32_t>(ranks_.size()); }

private:
    int32_t n_blocks_, block_size_;
    std::vector<std::unique_ptr<CpuKvPool>> ranks_;
};

class ShardedCpuBackend final : public Backend {
public:
    ShardedCpuBackend(const Checkpoint &ckpt, const BackendOptions &options, int32_t tp, int32_t ep,
                      ShardedCpuOptions sharded)
        : cfg_(ckpt.config()),
          plan_(ShardPlan::make(ckpt.config(), tp, ep)),
          sharded_(std::move(sharded)),
          workers_(static_cast<size_t>(plan_.world_size)) {
        check_backend_config(cfg_, static_cast<int64_t>(ckpt.weights().layers.size()), "sharded CPU backend");
        int32_t total = options.n_threads > 0 ? options.n_threads
                                              : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
        const int32_t per_rank = std::max(1, total / plan_.world_size);
        for (int32_t r = 0; r < plan_.world_size; ++r)
            ranks_.push_back(std::make_unique<CpuRank>(cfg_, ckpt.weights(), plan_, r, per_rank));
        comms_ = ThreadCommunicator::create_group(plan_.world_size, sharded_.timeout);
    }

    std::string name() const override {
        return "cpu-sharded(tp " + std::to_string(plan_.tp) + ", ep " + std::to_string(plan_.ep) + ")";
    }

    // All ranks' KV heads together: replicated KV heads count once per rank holding them.
    int64_t kv_bytes_per_block(int32_t block_size) const override {
        int64_t heads = 0;
        for (int32_t r = 0; r < plan_.world_size; ++r) heads += plan_.shard(r).kv_heads.size();
        return int64_t{cfg_.n_layers} * 2 * block_size * heads * cfg_.head_dim * int64_t{sizeof(float)};
    }

    int64_t kv_memory_available() const override { return kCpuKvMemory; }

    std::unique_ptr<KvPool> create_kv_pool(int32_t n_blocks, int32_t block_size) override {
        return std::make_unique<ShardedKvPool>(cfg_, plan_, n_blocks, block_size);
    }

    void forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) override;

private:
    ShardedKvPool &check_inputs(KvPool &pool, std::span<const SeqStep> batch, float *logits) const;

    const ModelConfig cfg_;
    const ShardPlan plan_;
    const ShardedCpuOptions sharded_;
    std::vector<std::unique_ptr<CpuRank>> ranks_;
    std::vector<std::unique_ptr<ThreadCommunicator>> comms_;
    std::mutex mutex_;
    std::string dead_;  // why the group failed; empty while healthy (guarded by mutex_)
    // Declared last, so destroyed first: its idle threads are joined while the ranks still exist.
    // Destroying the backend during a forward is the caller's error anyway (forward holds mutex_).
    RankWorkers workers_;
};

ShardedKvPool &ShardedCpuBackend::check_inputs(KvPool &pool, std::span<const SeqStep> batch, float *logits) const {
    auto *kv = dynamic_cast<ShardedKvPool *>(&pool);
    if (!kv || kv->world_size() != plan_.world_size)
        invalid_argument("sharded CPU backend forward: the KV pool was not created by this backend");
    check_forward_steps(cfg_, batch, *kv, logits, "sharded CPU backend");
    return *kv;
}

void ShardedCpuBackend::forward(KvPool &pool, std::span<const SeqStep> batch, float *logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!dead_.empty()) fail(DBRX_ERR_ENGINE_DEAD, name() + " failed earlier and cannot run: " + dead_);
    ShardedKvPool &kv = check_inputs(pool, batch, logits);

    StepInput step;
    step.batch = batch;
    for (size_t s = 0; s < batch.size(); ++s) {
        for (size_t i = 0; i < batch[s].tokens.size(); ++i)
            step.tokens.push_back({static_cast<int32_t>(s), batch[s].pos0 + static_cast<int32_t>(i)});
        if (batch[s].want_logits) step.logit_rows.push_back(static_cast<int64_t>(step.tokens.size()) - 1);
    }
    if (step.tokens.empty()) return;

    // Each rank on its own thread, the same on every step (rank_threads.h: the first failure is the root cause).
    const std::string failure = workers_.run(
        [&](size_t r) {
            ranks_[r]->forward(step, kv.rank(static_cast<int32_t>(r)), *comms_[r], logits, sharded_.before_layer);
        },
        [](size_t r) { return "rank " + std::to_string(r); },
        [&](size_t r, const std::string &why) { comms_[r]->abort(why); });
    if (!failure.empty()) {
        dead_ = failure;
        fail(DBRX_ERR_ENGINE_DEAD, name() + ": " + failure);
    }
}

}  // namespace

std::unique_ptr<Backend> make_sharded_cpu_backend(const Checkpoint &ckpt, const BackendOptions &options, int32_t tp,
                                                  int32_t ep, const ShardedCpuOptions &sharded) {
    return std::make_unique<ShardedCpuBackend>(ckpt, options, tp, ep, sharded);
}

std::unique_ptr<Backend> make_parallel_cpu_backend(const Checkpoint &ckpt, const BackendOptions &options) {
    if (options.tp == 1 && options.ep == 1) return make_cpu_backend(ckpt, options);
    return make_sharded_cpu_backend(ckpt, options, options.tp, options.ep);
}

}  // namespace dbrx::dist
