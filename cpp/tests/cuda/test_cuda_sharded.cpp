// The sharded CUDA backend (dist/sharded_cuda_backend.h) against the one-GPU CUDA backend on both
// fixtures. On one GPU the ranks share GPU 0 and meet through host memory (CudaTransport::Host):
// that proves the sharded math (head split, row-parallel out_proj, FFN split, expert parallelism,
// vocab-parallel lm_head) with the real kernels. With two GPUs, tp 2 runs over NCCL as in production.
// Tolerance: bf16 weights and activations, fp32 partial sums added in another order: max |logit
// difference| <= 0.05, greedy ids equal wherever the float64 reference's margin exceeds 0.2.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include "backend/cuda/cuda_util.h"
#include "backend_seq.h"
#include "dbrx/dbrx.h"
#include "dist/sharded_cuda_backend.h"
#include "io/checkpoint.h"
#include "cuda_test_util.h"
#include "reference_fixture.h"
#include "routing_ties.h"
#include "util/error.h"

namespace dbrx::dist {
namespace {

using namespace std::chrono_literals;
using dbrx::testing::prefill;
using dbrx::testing::RefCase;
using dbrx::testing::Seq;
using dbrx::testing::sequential_blocks;

constexpr int32_t kBlockSize = 16;
constexpr float kShardTolerance = 0.05f;
constexpr double kMarginFloor = 0.2;
const char *const kFixtures[] = {"/fixtures/tiny-dbrx", "/models/tiny-dbrx-cl100k"};

float max_abs_diff(const std::vector<float> &a, const std::vector<float> &b) {
    float m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
}

int32_t argmax(const std::vector<float> &v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

using dbrx::cuda::test::visible_gpus;

// DBRX_CUDA_GRAPHS=0 turns the decode graphs off (cuda_backend.h).
bool graphs_enabled() {
    const char *v = std::getenv("DBRX_CUDA_GRAPHS");
    return !v || !(std::string(v) == "0" || std::string(v) == "false" || std::string(v) == "off");
}

ShardedCudaOptions on_gpu0(int32_t ranks) {
    ShardedCudaOptions o;
    o.devices.assign(static_cast<size_t>(ranks), 0);
    o.transport = CudaTransport::Host;
    o.timeout = 60s;
    return o;
}

// A tp 2 backend (options `o`) whose rank 1 throws at layer 1, after one prefill: the step must
// have failed promptly (well before the collective timeout) with ENGINE_DEAD naming the injected
// failure. Returns the (dead) backend, its pool and the step's error message.
struct FailedStep {
    std::unique_ptr<ShardedCudaBackend> backend;
    std::unique_ptr<KvPool> pool;
    std::string error;
};
FailedStep step_with_failing_rank(const Checkpoint &ckpt, ShardedCudaOptions o) {
    o.before_layer = [](int32_t rank, int32_t layer) {
        if (rank == 1 && layer == 1) throw std::runtime_error("injected failure on rank 1");
    };
    FailedStep f;
    f.backend = make_sharded_cuda_backend(ckpt, 2, 1, o);
    f.pool = f.backend->create_kv_pool(8, kBlockSize);
    Seq s{sequential_blocks(0, 8)};
    const auto start = std::chrono::steady_clock::now();
    try {
        prefill(*f.backend, *f.pool, s, {1, 2, 3}, 0, ckpt.config().vocab_size);
        ADD_FAILURE() << "the step succeeded despite a failing rank";
    } catch (const Error &e) {
        f.error = e.what();
        EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD) << e.what();
        EXPECT_NE(f.error.find("injected failure"), std::string::npos) << e.what();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 30s) << "failure took the collective timeout";
    return f;
}

// Every case of the fixture through both backends, teacher-forced along the reference's greedy ids:
// the logits of every step within kShardTolerance unless the one-GPU run's routing of the step's
// token is a near-tie (routing_ties.h), and the same argmax where the reference's margin is clear.
void expect_same_as_one_gpu(const std::string &fixture, Backend &sharded, Backend &one) {
    dbrx::testing::ReferenceFixture f(std::string(DBRX_SOURCE_DIR) + fixture);
    const int32_t V = f.vocab();
    auto *one_cuda = dynamic_cast<cuda::CudaBackend *>(&one);
    ASSERT_NE(one_cuda, nullptr);
    cuda::test::RoutingTieWatch ties(*one_cuda, f.ckpt->config().top_k);
    int32_t n_ties = 0;
    auto pool_s = sharded.create_kv_pool(64, kBlockSize);
    auto pool_1 = one.create_kv_pool(64, kBlockSize);
    for (size_t ci = 0; ci < f.cases.size(); ++ci) {
        const RefCase &c = f.cases[ci];
        Seq ss{sequential_blocks(0, 64)}, s1{sequential_blocks(0, 64)};
        // Chunks of 20: flash attention over a cached prefix on the longer prompts.
        std::vector<float> ls = prefill(sharded, *pool_s, ss, c.prompt, 20, V);
        std::vector<float> l1 = prefill(one, *pool_1, s1, c.prompt, 20, V);
        float worst = 0;
        int checked = 0;
        for (size_t s = 0; s < c.greedy.size(); ++s) {
            if (ties.near_tie()) {
                ++n_ties;
                std::printf("%s case %zu step %zu: routing near-tie (router logit gap %.2e), |logit diff| %.4f not "
                            "held\n", fixture.c_str(), ci, s, ties.gap(), max_abs_diff(ls, l1));
            } else {
                worst = std::max(worst, max_abs_diff(ls, l1));
                ASSERT_LE(max_abs_diff(ls, l1), kShardTolerance)
                    << fixture << " case " << ci << " step " << s << " (router logit gap " << ties.gap() << ")";
            }
            if (c.margins[s] > kMarginFloor) {
                EXPECT_EQ(argmax(ls), argmax(l1)) << fixture << " case " << ci << " greedy step " << s;
                EXPECT_EQ(argmax(ls), c.greedy[s]) << fixture << " case " << ci << " greedy step " << s;
                ++checked;
            }
            if (s + 1 < c.greedy.size()) {
                ls = prefill(sharded, *pool_s, ss, {c.greedy[s]}, 0, V);
                l1 = prefill(one, *pool_1, s1, {c.greedy[s]}, 0, V);
            }
        }
        std::printf("%s %s case %zu: max |logit diff| vs one GPU %.5f over %zu steps, %d greedy ids checked\n",
                    sharded.name().c_str(), fixture.c_str(), ci, worst, c.greedy.size(), checked);
    }
    // The exclusion must stay an exception, or the comparison would prove nothing.
    EXPECT_LE(n_ties, 8) << fixture << ": routing near-ties at " << n_ties << " steps";
}

struct Layout {
    int32_t tp, ep;
};

class CudaShardedOneGpu : public ::testing::TestWithParam<Layout> {};

TEST_P(CudaShardedOneGpu, MatchesOneRankOnBothFixtures) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device visible";
    const Layout lay = GetParam();
    for (const char *fixture : kFixtures) {
        SCOPED_TRACE(fixture);
        auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + fixture);
        auto sharded = make_sharded_cuda_backend(*ckpt, lay.tp, lay.ep, on_gpu0(lay.tp * lay.ep));
        auto one = make_cuda_backend(*ckpt, BackendOptions{}, nullptr, nullptr);
        expect_same_as_one_gpu(fixture, *sharded, *one);
    }
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaShardedOneGpu, ::testing::Values(Layout{2, 1}, Layout{1, 2}),
                         [](const auto &info) {
                             return "tp" + std::to_string(info.param.tp) + "_ep" + std::to_string(info.param.ep);
                         });

// Several sequences in one step, prefills and decodes mixed: each rank's gathered logits rows land
// in batch order, and match the same sequences run through one GPU.
TEST(CudaSharded, MixedBatchRowsMatchOneRank) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device visible";
    auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + kFixtures[1]);
    const int32_t V = ckpt->config().vocab_size;
    auto sharded = make_sharded_cuda_backend(*ckpt, 1, 2, on_gpu0(2));
    auto one = make_cuda_backend(*ckpt, BackendOptions{}, nullptr, nullptr);
    std::vector<int32_t> a(40), b(3), c(25);
    for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int32_t>((i * 7919 + 11) % V);
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<int32_t>((i * 104729 + 5) % V);
    for (size_t i = 0; i < c.size(); ++i) c[i] = static_cast<int32_t>((i * 15485863 + 3) % V);
    std::vector<std::vector<float>> out;
    for (Backend *be : {static_cast<Backend *>(sharded.get()), one.get()}) {
        auto pool = be->create_kv_pool(32, kBlockSize);
        Seq sa{sequential_blocks(0, 8)}, sb{sequential_blocks(8, 8)}, sc{sequential_blocks(16, 8)};
        prefill(*be, *pool, sa, a, 0, V);  // a is cached; then a decodes while b and c prefill
        const int32_t next = 17;
        std::vector<SeqStep> steps = {SeqStep{std::span<const int32_t>(&next, 1), sa.cached, sa.blocks, true},
                                      SeqStep{b, 0, sb.blocks, false}, SeqStep{c, 0, sc.blocks, true}};
        std::vector<float> logits(2 * static_cast<size_t>(V));
        be->forward(*pool, steps, logits.data());
        out.push_back(logits);
    }
    EXPECT_LE(max_abs_diff(out[0], out[1]), kShardTolerance);
    EXPECT_EQ(argmax(std::vector<float>(out[0].begin(), out[0].begin() + V)),
              argmax(std::vector<float>(out[1].begin(), out[1].begin() + V)));
}

// A rank that throws mid-step fails the whole group promptly with ENGINE_DEAD naming it, and the
// backend stays dead; nothing hangs.
TEST(CudaSharded, RankFailureIsEngineDeadNotAHang) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device visible";
    auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + kFixtures[0]);
    FailedStep f = step_with_failing_rank(*ckpt, on_gpu0(2));
    EXPECT_NE(f.error.find("rank 1"), std::string::npos) << f.error;
    Seq again{sequential_blocks(0, 8)};
    try {
        prefill(*f.backend, *f.pool, again, {1}, 0, ckpt->config().vocab_size);
        ADD_FAILURE() << "a dead group ran another step";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_ENGINE_DEAD) << e.what();
    }
}

// Bad input is the batch's error only (INVALID_ARGUMENT), checked before any rank starts.
TEST(CudaSharded, BadInputFailsTheBatchNotTheGroup) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device visible";
    auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + kFixtures[0]);
    auto sharded = make_sharded_cuda_backend(*ckpt, 2, 1, on_gpu0(2));
    auto pool = sharded->create_kv_pool(8, kBlockSize);
    Seq s{sequential_blocks(0, 8)};
    const int32_t bad = ckpt->config().vocab_size;
    try {
        prefill(*sharded, *pool, s, {bad}, 0, ckpt->config().vocab_size);
        ADD_FAILURE() << "token id outside the vocabulary accepted";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_INVALID_ARGUMENT) << e.what();
    }
    Seq ok{sequential_blocks(0, 8)};
    EXPECT_NO_THROW(prefill(*sharded, *pool, ok, {1, 2}, 0, ckpt->config().vocab_size));
}

// Splits the CUDA attention cannot run are refused up front, naming the reason.
TEST(CudaSharded, UnsupportedSplitsAreRefused) {
    if (visible_gpus() < 1) GTEST_SKIP() << "no CUDA device visible";
    auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + kFixtures[0]);
    try {
        make_sharded_cuda_backend(*ckpt, 4, 1, on_gpu0(4));  // 4 ranks, 2 query heads
        ADD_FAILURE() << "more ranks than query heads accepted";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_UNSUPPORTED) << e.what();
        EXPECT_NE(std::string(e.what()).find("more ranks than"), std::string::npos) << e.what();
    }
    try {
        make_sharded_cuda_backend(*ckpt, 2, 1, on_gpu0(3));
        ADD_FAILURE() << "3 devices for 2 ranks accepted";
    } catch (const Error &e) {
        EXPECT_EQ(e.status(), DBRX_ERR_INVALID_ARGUMENT) << e.what();
    }
}

// Production: tp 2 over NCCL across two GPUs.
TEST(CudaSharded, NcclTwoGpusMatchOneRank) {
    const int n = visible_gpus();
    if (n < 2) GTEST_SKIP() << "NCCL tp 2 needs 2 GPUs; " << n << " visible";
    for (const char *fixture : kFixtures) {
        SCOPED_TRACE(fixture);
        auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + fixture);
        ShardedCudaOptions o;
        o.devices = {0, 1};
        o.rendezvous.rank = 0;  // this process alone, whatever the environment says
        o.rendezvous.world_size = 1;
        o.timeout = 60s;
        auto sharded = make_sharded_cuda_backend(*ckpt, 2, 1, o);
        auto one = make_cuda_backend(*ckpt, BackendOptions{}, nullptr, nullptr);
        expect_same_as_one_gpu(fixture, *sharded, *one);
        // The decode steps ran as CUDA graphs holding the collectives, the same ones on both ranks.
        if (graphs_enabled()) {
            const std::vector<CudaRankStats> st = sharded->rank_stats();
            ASSERT_EQ(st.size(), 2u);
            EXPECT_GT(st[0].graph_replays, 0) << "no decode step replayed a graph";
            EXPECT_EQ(st[0].graph_replays, st[1].graph_replays);
            EXPECT_EQ(st[0].graph_captures, st[1].graph_captures);
        }
    }
}

// Over NCCL a rank that throws mid-step leaves its peer's GPU inside a collective: the peer's
// end-of-step wait sees the abort, aborts its communicator (which releases the kernel) and the
// group fails with ENGINE_DEAD naming rank 1, promptly; afterwards the backend stays dead.
TEST(CudaSharded, NcclRankFailureIsEngineDeadNotAHang) {
    const int n = visible_gpus();
    if (n < 2) GTEST_SKIP() << "NCCL tp 2 needs 2 GPUs; " << n << " visible";
    auto ckpt = Checkpoint::open(std::string(DBRX_SOURCE_DIR) + kFixtures[0]);
    ShardedCudaOptions o;
    o.devices = {0, 1};
    o.rendezvous.rank = 0;
    o.rendezvous.world_size = 1;
    o.timeout = 60s;
    FailedStep f = step_with_failing_rank(*ckpt, o);
    Seq again{sequential_blocks(0, 8)};
    EXPECT_THROW(prefill(*f.backend, *f.pool, again, {1}, 0, ckpt->config().vocab_size), Error);
}

// Through the C API: tp 2 takes GPUs 0 and 1; with one GPU that is a clear UNSUPPORTED error, with
// two the greedy continuation of every case equals one GPU's where the reference margin is clear.
TEST(CudaSharded, CApiTensorParallelTwo) {
    const int n = visible_gpus();
    if (n < 1) GTEST_SKIP() << "no CUDA device visible";
    const std::string dir = std::string(DBRX_SOURCE_DIR) + kFixtures[0];
    dbrx_model_params mp = dbrx_model_default_params();
    mp.device = DBRX_DEVICE_CUDA;
    mp.tensor_parallel = 2;
    mp.n_nodes = 1;
    mp.node_rank = 0;
    dbrx_model *model = nullptr;
    const dbrx_status st = dbrx_model_load(dir.c_str(), &mp, &model);
    if (n < 2) {
        EXPECT_EQ(st, DBRX_ERR_UNSUPPORTED) << dbrx_last_error();
        EXPECT_NE(std::string(dbrx_last_error()).find("device 1 requested but 1 CUDA device"), std::string::npos)
            << dbrx_last_error();
        EXPECT_EQ(model, nullptr);
        return;
    }
    ASSERT_EQ(st, DBRX_OK) << dbrx_last_error();
    dbrx_model_params one_p = dbrx_model_default_params();
    one_p.device = DBRX_DEVICE_CUDA;
    dbrx_model *one = nullptr;
    ASSERT_EQ(dbrx_model_load(dir.c_str(), &one_p, &one), DBRX_OK) << dbrx_last_error();
    const auto cases = dbrx::testing::load_ref_cases(dir);
    for (dbrx_model *m : {model, one}) {
        dbrx_engine_params ep = dbrx_engine_default_params();
        ep.kv_blocks = 64;
        dbrx_engine *engine = nullptr;
        ASSERT_EQ(dbrx_engine_create(m, &ep, &engine), DBRX_OK) << dbrx_last_error();
        for (size_t ci = 0; ci < cases.size(); ++ci) {
            const RefCase &c = cases[ci];
            dbrx_sampling_params sp = dbrx_sampling_default_params();
            sp.max_tokens = static_cast<int32_t>(c.greedy.size());
            sp.n_stop_ids = 0;
            std::vector<int32_t> ids(c.greedy.size());
            int32_t n_out = 0;
            dbrx_finish_reason finish = DBRX_FINISH_NONE;
            ASSERT_EQ(dbrx_generate(engine, c.prompt.data(), static_cast<int32_t>(c.prompt.size()), &sp, ids.data(),
                                    static_cast<int32_t>(ids.size()), &n_out, nullptr, &finish),
                      DBRX_OK)
                << dbrx_last_error();
            // Free-running greedy: binding up to the first step whose reference margin is small.
            for (int32_t s = 0; s < n_out && c.margins[s] > kMarginFloor; ++s)
                EXPECT_EQ(ids[s], c.greedy[s]) << (m == model ? "tp 2" : "one GPU") << " case " << ci << " step " << s;
        }
        dbrx_engine_free(engine);
    }
    dbrx_model_free(model);
    dbrx_model_free(one);
}

}  // namespace
}  // namespace dbrx::dist
