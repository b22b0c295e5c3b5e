// The Hopper wgmma prefill kernel (flash_prefill_wgmma and its shapes) against cpu::attend_one and
// against flash_prefill (the mma.sync kernel): chunks of 1..300 rows over prefixes 0 and 1000, several
// sequences per launch, ragged tiles, odd block sizes, strict per-row checks at tiny-dbrx's and DBRX's
// head counts, the backend's use (chunks of 20 over a prefix, long block tables, metadata packed in
// one buffer, every kind of stream, two host threads at once), then one long sequence at S=4096 and
// S=16384, timed against flash_prefill. Every launch is waited for with a 10 s bound: a kernel that
// hangs ends the process with a message instead of stalling the run.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#include "backend/cuda/flash_prefill_wgmma.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "flash_test_problem.h"
#include "util/error.h"

namespace dbrx::cuda::test {
namespace {

constexpr int32_t kH = 48, kKV = 8, kHd = 128;  // DBRX
constexpr Shape kDbrx{kH, kKV, kHd};

// Waits for `stream` at most `limit_s`; a launch still running then is taken as a hang.
void wait_bounded(cudaStream_t stream, const char *what, double limit_s = 10.0) {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        const cudaError_t e = cudaStreamQuery(stream);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) DBRX_CUDA_CHECK(e);
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit_s) {
            std::fprintf(stderr, "FAIL: %s still running after %.0f s (hang?); exiting\n", what, limit_s);
            std::fflush(stdout);
            std::fflush(stderr);
            std::_Exit(3);
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
}

// False (the test skips) off Hopper; on a Hopper the build must hold the sm_90a kernel.
bool hopper_ready() {
    int dev = 0, major = 0, minor = 0;
    DBRX_CUDA_CHECK(cudaGetDevice(&dev));
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (major != 9 || minor != 0) return false;
    EXPECT_TRUE(flash_prefill_wgmma_supported(kHd, 16)) << "Hopper device, but no sm_90a kernel in this build";
    EXPECT_FALSE(flash_prefill_wgmma_supported(64, 16));
    EXPECT_FALSE(flash_prefill_wgmma_supported(kHd, 0));
    return flash_prefill_wgmma_supported(kHd, 16);
}

// Device copies of a problem; run() launches one kernel (variant -2: flash_prefill, -1:
// flash_prefill_wgmma, else a wgmma shape) and returns the output.
struct DeviceProblem {
    DeviceBuffer cache, q, pos, seq, boff, blocks, tiles, out;
    KvLayer kv;
    TokenMeta meta;
    int32_t n_tiles, Tn, H;
    Stream stream;
    explicit DeviceProblem(const Problem &p)
        : cache(to_device(p.cache)), q(to_device(p.q)), pos(to_device(p.new_pos)), seq(to_device(p.new_seq)),
          boff(to_device(p.block_off)), blocks(to_device(p.blocks)), tiles(to_device(p.tiles)),
          out(sizeof(bf16_t) * std::max<size_t>(1, p.q.size())), kv{cache.as<bf16_t>(), 2 * p.half(), p.half(), p.bs, p.s.KV, p.s.hd},
          meta{pos.as<int32_t>(), seq.as<int32_t>(), boff.as<int32_t>(), blocks.as<int32_t>()},
          n_tiles(static_cast<int32_t>(p.tiles.size() / 4)), Tn(p.n_tokens()), H(p.s.H) {
        // Pageable cudaMemcpy may return before its DMA lands; the launches run on a non-blocking stream.
        DBRX_CUDA_CHECK(cudaDeviceSynchronize());
    }
    void launch(int32_t variant) {
        const float *qp = q.as<float>();
        const int32_t *tp = tiles.as<int32_t>();
        if (variant == -2) flash_prefill(qp, n_tiles, H, tp, meta, kv, out.as<bf16_t>(), stream.get());
        else if (variant == -1) flash_prefill_wgmma(qp, n_tiles, H, tp, meta, kv, out.as<bf16_t>(), stream.get());
        else wgfa::prefill_variant(variant, qp, n_tiles, H, tp, meta, kv, out.as<bf16_t>(), stream.get());
    }
    std::vector<float> run(int32_t variant) {
        DBRX_CUDA_CHECK(cudaMemsetAsync(out.get(), 0xff, out.bytes(), stream.get()));  // NaN where a row is not written
        launch(variant);
        wait_bounded(stream.get(), name(variant));
        return collect(name(variant));
    }
    // flash_prefill_wgmma with the tiles and metadata at `tp` / `m` (copies elsewhere), on stream `s`.
    std::vector<float> run_wgmma_on(const int32_t *tp, TokenMeta m, cudaStream_t s) {
        DBRX_CUDA_CHECK(cudaMemsetAsync(out.get(), 0xff, out.bytes(), s));
        flash_prefill_wgmma(q.as<float>(), n_tiles, H, tp, m, kv, out.as<bf16_t>(), s);
        wait_bounded(s, "flash_prefill_wgmma");
        return collect("flash_prefill_wgmma");
    }
    std::vector<float> collect(const char *what) {
        auto got = to_f32(to_host<bf16_t>(out.get(), static_cast<size_t>(Tn) * H * kHd));
        // rel_max_err skips NaN (std::max), so unwritten or poisoned rows are counted here.
        const auto bad = std::count_if(got.begin(), got.end(), [](float x) { return !std::isfinite(x); });
        EXPECT_EQ(bad, 0) << "non-finite outputs of " << what;
        return got;
    }
    static const char *name(int32_t variant) {
        return variant == -2 ? "flash_prefill" : variant == -1 ? "flash_prefill_wgmma" : wgfa::variant_name(variant);
    }
};

// The rows of heads `heads` (all rows) of `v` ([Tn][H][hd]).
std::vector<float> pick_heads(const std::vector<float> &v, int32_t Tn, std::span<const int32_t> heads) {
    std::vector<float> r;
    for (int32_t t = 0; t < Tn; ++t)
        for (int32_t h : heads) r.insert(r.end(), v.begin() + (int64_t{t} * kH + h) * kHd, v.begin() + (int64_t{t} * kH + h + 1) * kHd);
    return r;
}

// Every row of five heads (three KV groups) against the reference and every head against
// flash_prefill, for flash_prefill_wgmma and every wgmma shape.
void check_chunks(int32_t bs, std::vector<Chunk> chunks, uint32_t seed) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    const Problem p = make_problem(kDbrx, bs, std::move(chunks), seed);
    constexpr int32_t kHeads[] = {0, 5, 6, 40, 47};
    Reference ref_of{p};
    std::vector<float> ref;
    std::vector<float> row(kHd);
    for (int32_t t = 0; t < p.n_tokens(); ++t)
        for (int32_t h : kHeads) {
            ref_of.attend(t, h, row.data());
            ref.insert(ref.end(), row.begin(), row.end());
        }
    DeviceProblem d(p);
    const auto base = d.run(-2);
    for (int32_t v = -1; v < wgfa::variant_count(); ++v) {
        const auto got = d.run(v);
        const double err = rel_max_err(pick_heads(got, p.n_tokens(), kHeads), ref), diff = rel_max_err(got, base);
        std::printf("wgmma bs=%d tokens=%d tiles=%d %s: max rel err %.2e vs cpu, %.2e vs flash_prefill\n", bs,
                    p.n_tokens(), d.n_tiles, DeviceProblem::name(v), err, diff);
        EXPECT_LT(err, 2e-2) << DeviceProblem::name(v);  // bf16 Q and P
        EXPECT_LT(diff, 2e-2) << DeviceProblem::name(v);
    }
}

TEST(CudaFlashWgmma, DbrxChunksPrefix0) {
    check_chunks(16, {{0, 1}, {0, 64}, {0, 127}, {0, 128}, {0, 129}, {0, 300}}, 51);
}
TEST(CudaFlashWgmma, DbrxChunksPrefix1000) {
    check_chunks(16, {{1000, 1}, {1000, 64}, {1000, 127}, {1000, 128}, {1000, 129}, {1000, 300}}, 52);
}
TEST(CudaFlashWgmma, MixedPrefixesAndBlockSizes) {
    check_chunks(16, {{37, 255}, {200, 129}, {1000, 17}, {5, 31}}, 53);
    check_chunks(7, {{0, 130}, {200, 45}}, 54);
    check_chunks(64, {{1000, 100}, {0, 70}}, 55);
}

// Strict per-row check of one sequence, the shape of tiny-dbrx's 130-token prompt (a full tile, then a
// tile of a few rows whose second warpgroup has none) at small and DBRX head counts: EVERY row of every
// head against cpu::attend_one and against flash_prefill, each row within kRowTol * max(1, max |ref
// row|), so that one wrong row cannot hide behind the whole output's magnitude. Cache slots past the
// sequence's end hold NaN and the largest finite bf16 in turn (K and V swapped), so a key read past
// the end shows, whether its P is masked to 0 or not. Q is uniform in +-3 * qmul; `peaked` adds 3x
// its own key to the query of two tokens in three, so that those rows' diagonal key outscores their
// first key tile by ~12 in log2 units: the running max moves past the first tile, in some warps of
// a warpgroup and not in others (the DBRX-shape tests' uniform scores never move it past the lazy
// slack of 2^8, so they never take the rescale path). Each kernel also runs twice: a kernel that
// reads what it has not written, or races, shows as two different outputs.
constexpr double kRowTol = 2e-2;

// Adds 3 K(own position) to the queries of tokens t % 3 != 1 (see above).
void peak_on_diagonal(Problem &p) {
    const Shape &s = p.s;
    for (int32_t t = 0; t < p.n_tokens(); ++t) {
        if (t % 3 == 1) continue;
        const int32_t pos = p.new_pos[t], sq = p.new_seq[t];
        const int64_t blk = p.blocks[p.block_off[sq] + pos / p.bs];
        for (int32_t h = 0; h < s.H; ++h) {
            const int32_t kvh = h / (s.H / s.KV);
            const bf16_t *k = p.cache.data() + blk * 2 * p.half() + (int64_t{pos % p.bs} * s.KV + kvh) * s.hd;
            float *q = p.q.data() + (int64_t{t} * s.H + h) * s.hd;
            for (int32_t i = 0; i < s.hd; ++i) q[i] += 3.f * bf16_to_float(k[i]);
        }
    }
}

void poison_tails(Problem &p) {
    int32_t boff = 0;
    for (const Chunk &c : p.chunks) {
        const int32_t len = c.prefix + c.n_new, nb = (len + p.bs - 1) / p.bs;
        for (int32_t slot = len; slot < nb * p.bs; ++slot) {
            const int64_t off = p.blocks[boff + slot / p.bs] * 2 * p.half() + int64_t{slot % p.bs} * p.s.KV * p.s.hd;
            const bf16_t big = 0x7f7f, nan = 0x7fc0;  // 3.39e38 and NaN
            for (int64_t j = 0; j < int64_t{p.s.KV} * p.s.hd; ++j) {
                p.cache[off + j] = (slot + j) % 2 ? nan : big;
                p.cache[off + p.half() + j] = (slot + j) % 2 ? big : nan;
            }
        }
        boff += nb;
    }
}

// Rows of `got` off `want` by more than the row tolerance (one failure per comparison, naming the
// first few rows), and the worst row's max |diff| / max(floor, max |want row|): floor 1 bounds the
// error of rows of magnitude < 1 absolutely, a small floor relatively.
double check_rows(const Problem &p, const std::vector<float> &got, const std::vector<float> &want, const std::string &what,
                  double floor = 1.0) {
    int32_t bad = 0;
    double worst = 0;
    std::string first;
    for (int32_t t = 0; t < p.n_tokens(); ++t)
        for (int32_t h = 0; h < p.s.H; ++h) {
            const int64_t o = (int64_t{t} * p.s.H + h) * p.s.hd;
            double diff = 0, mag = floor;
            for (int32_t i = 0; i < p.s.hd; ++i) {
                const double d = std::fabs(static_cast<double>(got[o + i]) - want[o + i]);
                diff = std::isfinite(d) ? std::max(diff, d) : INFINITY;
                mag = std::max(mag, std::fabs(static_cast<double>(want[o + i])));
            }
            worst = std::max(worst, diff / mag);
            if (!(diff <= kRowTol * mag) && bad++ < 4)
                first += " [token " + std::to_string(t) + " pos " + std::to_string(p.new_pos[t]) + " head " +
                         std::to_string(h) + ": " + std::to_string(diff) + "]";
        }
    EXPECT_EQ(bad, 0) << what << ": rows off by more than " << kRowTol << " x max(" << floor << ", |ref row|):" << first;
    return worst;
}

// Worst row of each kernel over a shape's cases: [0] flash_prefill vs cpu, then per wgmma kernel
// (flash_prefill_wgmma, then each shape) vs cpu and vs flash_prefill.
using Worst = std::vector<double>;

// Appends `extra` NaN blocks to the block table of a one-sequence problem, as the backend's tables
// cover the sequence's whole budget (64 blocks for 1024 positions in the backend tests), not its length.
void lengthen_table(Problem &p, int32_t extra) {
    ASSERT_EQ(p.chunks.size(), 1u);
    for (int32_t i = 0; i < extra; ++i) p.blocks.push_back(p.n_blocks++);
    p.cache.resize(static_cast<size_t>(p.n_blocks) * 2 * p.half(), 0x7fc0);
}

// floor: check_rows' (1: absolute below magnitude 1; small: per-row relative).
void check_strict(Shape s, int32_t prefix, int32_t n, float qmul, bool peaked, uint32_t seed, Worst &worst,
                  int32_t extra_blocks = 0, double floor = 1.0) {
    Problem p = make_problem(s, 16, {{prefix, n}}, seed);
    for (float &x : p.q) x *= qmul;
    if (peaked) peak_on_diagonal(p);
    poison_tails(p);
    lengthen_table(p, extra_blocks);
    Reference ref_of{p};
    std::vector<float> ref(static_cast<size_t>(p.n_tokens()) * s.H * s.hd);
    for (int32_t t = 0; t < p.n_tokens(); ++t)
        for (int32_t h = 0; h < s.H; ++h) ref_of.attend(t, h, ref.data() + (int64_t{t} * s.H + h) * s.hd);
    DeviceProblem d(p);
    const std::string where = "H=" + std::to_string(s.H) + " KV=" + std::to_string(s.KV) + " prefix " +
                              std::to_string(prefix) + " rows " + std::to_string(n) + " qmul " + std::to_string(qmul) +
                              (peaked ? " peaked" : "") + " floor " + std::to_string(floor);
    const auto base = d.run(-2);
    worst.resize(1 + 2 * (1 + wgfa::variant_count()), 0.0);
    worst[0] = std::max(worst[0], check_rows(p, base, ref, where + " flash_prefill vs cpu", floor));
    for (int32_t v = -1; v < wgfa::variant_count(); ++v) {
        const auto got = d.run(v);
        const size_t i = 1 + 2 * static_cast<size_t>(v + 1);
        worst[i] = std::max(worst[i], check_rows(p, got, ref, where + " " + DeviceProblem::name(v) + " vs cpu", floor));
        worst[i + 1] = std::max(
            worst[i + 1], check_rows(p, got, base, where + " " + DeviceProblem::name(v) + " vs flash_prefill", floor));
        EXPECT_TRUE(d.run(v) == got) << where << " " << DeviceProblem::name(v) << ": two runs differ";
    }
}

void print_worst(const char *what, Shape s, const Worst &worst) {
    std::printf("%s H=%d KV=%d worst row: flash_prefill vs cpu %.2e", what, s.H, s.KV, worst[0]);
    for (int32_t v = -1; v < wgfa::variant_count(); ++v)
        std::printf("; %s vs cpu %.2e, vs flash_prefill %.2e", DeviceProblem::name(v), worst[1 + 2 * (v + 1)],
                    worst[2 + 2 * (v + 1)]);
    std::printf("\n");
}

void check_strict_shape(Shape s, uint32_t seed) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    Worst worst;
    for (int32_t prefix : {0, 7})
        for (int32_t n : {130, 129, 131, 255, 257})
            for (int mode = 0; mode < 3; ++mode)
                check_strict(s, prefix, n, mode == 1 ? 2.5f : 1.f, mode == 2, seed++, worst);
    // The last chunk of tiny-dbrx's 130-token prompt prefilled in chunks of 20 (rows 120..129).
    for (int mode = 0; mode < 3; ++mode) check_strict(s, 120, 10, mode == 1 ? 2.5f : 1.f, mode == 2, seed++, worst);
    print_worst("strict", s, worst);
}


TEST(CudaFlashWgmma, StrictRowsH2KV1) { check_strict_shape({2, 1, kHd}, 71); }  // tiny-dbrx, one rank
TEST(CudaFlashWgmma, StrictRowsH1KV1) { check_strict_shape({1, 1, kHd}, 81); }  // tiny-dbrx, tensor parallel 2
TEST(CudaFlashWgmma, StrictRowsH8KV8) { check_strict_shape({8, 8, kHd}, 91); }
TEST(CudaFlashWgmma, StrictRowsH48KV8) { check_strict_shape(kDbrx, 101); }  // DBRX

// What the backend's use adds to the tests above. Chunked prefill as the backend tests run it:
// tiny-dbrx's 130-token prompt in chunks of 20 (one tile of 20 rows over prefixes 0, 20, .., 100,
// one key tile: n_kt = 1, the prologue / last-iteration path of the 2-stage pipeline; then 120, two
// key tiles), the block table 64 blocks long as the backend's (NaN past the sequence), rows held
// absolutely and, since attention outputs are mostly below 1 where an absolute bound hides a
// relative error, relatively.
void check_backend_chunks(Shape s, uint32_t seed) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    for (double floor : {1.0, 1e-3}) {
        Worst worst;
        for (int32_t prefix = 0; prefix <= 120; prefix += 20)  // 120: rows 120..139 cross the first key tile
            for (int mode = 0; mode < 3; ++mode)
                check_strict(s, prefix, 20, mode == 1 ? 2.5f : 1.f, mode == 2, seed++, worst, 64 - (prefix + 35) / 16,
                             floor);
        for (int32_t n : {130, 129})  // the whole prompt in one chunk, relative too
            check_strict(s, 0, n, 1.f, false, seed++, worst, 64 - (n + 15) / 16, floor);
        print_worst(floor == 1.0 ? "chunks of 20, absolute" : "chunks of 20, relative", s, worst);
    }
}
TEST(CudaFlashWgmma, BackendChunksOf20H2KV1) { check_backend_chunks({2, 1, kHd}, 111); }
TEST(CudaFlashWgmma, BackendChunksOf20H1KV1) { check_backend_chunks({1, 1, kHd}, 121); }

// The backend keeps every step's metadata in one int32 buffer (cuda_backend.cpp: ids, pos, seq,
// block offsets, out rows, decode rows, tiles, block tables), so the tiles start at any 4-byte
// offset. The output must be bit-identical to the one from separate, 256-byte-aligned arrays.
TEST(CudaFlashWgmma, MetadataInOneBufferAtEveryOffset) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    uint32_t seed = 131;
    for (Shape s : {Shape{2, 1, kHd}, Shape{1, 1, kHd}})
        for (Chunk c : {Chunk{0, 130}, Chunk{20, 20}, Chunk{100, 20}}) {
            const Problem p = make_problem(s, 16, {c}, seed++);
            DeviceProblem d(p);
            const auto want = d.run(-1);
            for (int32_t shift = 0; shift < 4; ++shift) {
                std::vector<int32_t> meta(static_cast<size_t>(shift), -7);
                auto put = [&](const std::vector<int32_t> &v) {
                    const size_t at = meta.size();
                    meta.insert(meta.end(), v.begin(), v.end());
                    return static_cast<int64_t>(at);
                };
                const int64_t pos = put(p.new_pos), seq = put(p.new_seq), boff = put(p.block_off), tiles = put(p.tiles),
                              blocks = put(p.blocks);
                const DeviceBuffer m = to_device(meta);
                DBRX_CUDA_CHECK(cudaDeviceSynchronize());  // the pageable upload has landed (non-blocking stream)
                const int32_t *base = m.as<int32_t>();
                const TokenMeta tm{base + pos, base + seq, base + boff, base + blocks};
                const auto got = d.run_wgmma_on(base + tiles, tm, d.stream.get());
                EXPECT_TRUE(got == want) << "H=" << s.H << " prefix " << c.prefix << " rows " << c.n_new
                                         << ": tiles at int32 offset " << tiles << " give another output";
            }
        }
}

// The legacy default stream, the per-thread default stream and a blocking stream (the tests use a
// non-blocking one): the same output, bit for bit.
TEST(CudaFlashWgmma, EveryKindOfStream) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    const Problem p = make_problem({2, 1, kHd}, 16, {{0, 130}}, 141);
    DeviceProblem d(p);
    const auto want = d.run(-1);
    cudaStream_t blocking = nullptr;
    DBRX_CUDA_CHECK(cudaStreamCreate(&blocking));
    const std::pair<const char *, cudaStream_t> streams[] = {
        {"legacy default", nullptr}, {"per-thread default", cudaStreamPerThread}, {"blocking", blocking}};
    for (const auto &[name, st] : streams) {
        const TokenMeta tm = d.meta;
        EXPECT_TRUE(d.run_wgmma_on(d.tiles.as<int32_t>(), tm, st) == want) << name << " stream";
    }
    DBRX_CUDA_CHECK(cudaStreamDestroy(blocking));
}

// Two host threads launching on their own streams at once, as the two ranks of a tensor-parallel
// model on one GPU do (1 query + 1 KV head each): every output bit-identical to a launch alone. The
// threads make the process's first calls (supported(): the sm_90a probe; the launch: the
// once-per-device shared-memory attribute), so run on its own (--gtest_filter=*TwoThreads*) this
// also covers their first use racing.
TEST(CudaFlashWgmma, TwoThreadsTwoStreams) {
    int dev = 0, major = 0, minor = 0;
    DBRX_CUDA_CHECK(cudaGetDevice(&dev));
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    DBRX_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (major != 9 || minor != 0) GTEST_SKIP() << "not an sm_90 device";
    constexpr int kReps = 40;
    const Problem p0 = make_problem({1, 1, kHd}, 16, {{0, 130}}, 151), p1 = make_problem({1, 1, kHd}, 16, {{40, 20}}, 152);
    DeviceProblem d0(p0), d1(p1);
    std::vector<std::vector<float>> outs[2];
    std::string errors[2];
    std::atomic<int> ready{0};
    auto rank = [&](int r) {
        DeviceProblem &d = r == 0 ? d0 : d1;
        try {
            DBRX_CUDA_CHECK(cudaSetDevice(dev));
            ready.fetch_add(1);
            while (ready.load() < 2) std::this_thread::yield();  // start together
            if (!flash_prefill_wgmma_supported(kHd, 16)) throw std::runtime_error("wgmma not supported");
            const size_t n = static_cast<size_t>(d.Tn) * d.H * kHd;
            std::vector<bf16_t> host(n);
            for (int i = 0; i < kReps; ++i) {
                DBRX_CUDA_CHECK(cudaMemsetAsync(d.out.get(), 0xff, d.out.bytes(), d.stream.get()));
                d.launch(-1);
                DBRX_CUDA_CHECK(cudaMemcpyAsync(host.data(), d.out.get(), n * sizeof(bf16_t), cudaMemcpyDeviceToHost,
                                                d.stream.get()));
                wait_bounded(d.stream.get(), "flash_prefill_wgmma (two threads)");
                outs[r].push_back(to_f32(host));
            }
        } catch (const std::exception &e) {
            errors[r] = e.what();
        }
    };
    std::thread t0(rank, 0), t1(rank, 1);
    t0.join();
    t1.join();
    for (int r = 0; r < 2; ++r) {
        ASSERT_EQ(errors[r], "") << "thread " << r;
        const auto alone = (r == 0 ? d0 : d1).run(-1);
        int differ = 0;
        for (const auto &o : outs[r]) differ += o == alone ? 0 : 1;
        EXPECT_EQ(differ, 0) << "thread " << r << ": " << differ << " of " << kReps << " concurrent launches differ from one alone";
    }
}

// Shapes the kernel is not built for are refused on the host, before any launch.
TEST(CudaFlashWgmma, RejectsUnsupportedShapes) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    const Problem p = make_problem(kDbrx, 16, {{0, 20}}, 56);
    DeviceProblem d(p);
    KvLayer kv = d.kv;
    kv.head_dim = 64;
    EXPECT_THROW(flash_prefill_wgmma(d.q.as<float>(), d.n_tiles, kH, d.tiles.as<int32_t>(), d.meta, kv,
                                     d.out.as<bf16_t>(), d.stream.get()),
                 Error);
    kv = d.kv;
    kv.block_stride += 1;  // rows no longer 16-byte aligned
    EXPECT_THROW(flash_prefill_wgmma(d.q.as<float>(), d.n_tiles, kH, d.tiles.as<int32_t>(), d.meta, kv,
                                     d.out.as<bf16_t>(), d.stream.get()),
                 Error);
    EXPECT_THROW(flash_prefill_wgmma(d.q.as<float>(), d.n_tiles, 47, d.tiles.as<int32_t>(), d.meta, d.kv,
                                     d.out.as<bf16_t>(), d.stream.get()),
                 Error);  // 47 query heads over 8 KV heads
    EXPECT_THROW(wgfa::prefill_variant(wgfa::variant_count(), d.q.as<float>(), d.n_tiles, kH, d.tiles.as<int32_t>(),
                                       d.meta, d.kv, d.out.as<bf16_t>(), d.stream.get()),
                 Error);
}

// Mean ms of `reps` launches after `warm` warm-ups, each batch bounded in time.
double time_ms(DeviceProblem &d, int32_t variant, int warm = 2, int reps = 5) {
    for (int i = 0; i < warm; ++i) d.launch(variant);
    wait_bounded(d.stream.get(), DeviceProblem::name(variant));
    cudaEvent_t e0, e1;
    DBRX_CUDA_CHECK(cudaEventCreate(&e0));
    DBRX_CUDA_CHECK(cudaEventCreate(&e1));
    DBRX_CUDA_CHECK(cudaEventRecord(e0, d.stream.get()));
    for (int i = 0; i < reps; ++i) d.launch(variant);
    DBRX_CUDA_CHECK(cudaEventRecord(e1, d.stream.get()));
    wait_bounded(d.stream.get(), DeviceProblem::name(variant));
    float ms = 0;
    DBRX_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    DBRX_CUDA_CHECK(cudaEventDestroy(e0));
    DBRX_CUDA_CHECK(cudaEventDestroy(e1));
    return ms / reps;
}

// One sequence of S tokens as one chunk: sampled rows against the reference, the whole output
// against flash_prefill, and the times of flash_prefill and every wgmma shape (causal FLOPs).
void check_long(int32_t S, uint32_t seed) {
    if (!hopper_ready()) GTEST_SKIP() << "not an sm_90 device";
    const Problem p = make_problem(kDbrx, 16, {{0, S}}, seed);
    DeviceProblem d(p);
    const auto base = d.run(-2);
    Reference ref_of{p};
    std::vector<float> ref, row(kHd);
    const int32_t rows[] = {0, 1, 63, 64, 127, 128, 1000, S / 2 + 5, S - 129, S - 65, S - 2, S - 1};
    for (int32_t t : rows)
        for (int32_t h : {0, 5, 6, 40, 47}) {
            ref_of.attend(t, h, row.data());
            ref.insert(ref.end(), row.begin(), row.end());
        }
    auto sampled = [&](const std::vector<float> &got) {
        std::vector<float> sel;
        for (int32_t t : rows)
            for (int32_t h : {0, 5, 6, 40, 47}) {
                const auto *g = got.data() + (int64_t{t} * kH + h) * kHd;
                sel.insert(sel.end(), g, g + kHd);
            }
        return sel;
    };
    const double flops = 4.0 * kHd * kH * (static_cast<double>(S) * (S + 1) / 2);
    const double base_ms = time_ms(d, -2);
    std::printf("wgmma S=%d %-28s %.3f ms  %.0f TFLOP/s  sampled rows vs cpu %.2e\n", S, "flash_prefill (mma.sync)",
                base_ms, flops / (base_ms * 1e-3) / 1e12, rel_max_err(sampled(base), ref));
    for (int32_t v = 0; v < wgfa::variant_count(); ++v) {
        const auto got = d.run(v);
        const double err = rel_max_err(sampled(got), ref), diff = rel_max_err(got, base);
        EXPECT_LT(err, 2e-2) << wgfa::variant_name(v);
        EXPECT_LT(diff, 2e-2) << wgfa::variant_name(v) << " differs from flash_prefill";
        const double ms = time_ms(d, v);
        std::printf("wgmma S=%d %-28s%s %.3f ms  %.0f TFLOP/s  x%.2f vs flash_prefill  (vs cpu %.1e, vs flash_prefill "
                    "%.1e)\n",
                    S, wgfa::variant_name(v), v == wgfa::default_variant() ? " [default]" : "", ms,
                    flops / (ms * 1e-3) / 1e12, base_ms / ms, err, diff);
    }
}

TEST(CudaFlashWgmma, DbrxLongSequence4096) { check_long(4096, 61); }
TEST(CudaFlashWgmma, DbrxLongSequence16384) { check_long(16384, 62); }

}  // namespace
}  // namespace dbrx::cuda::test
