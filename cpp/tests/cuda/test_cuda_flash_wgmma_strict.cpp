// The Hopper wgmma prefill kernel held row by row: strict per-row checks at tiny-dbrx's and DBRX's
// head counts, and the backend's use of it (chunks of 20 over a prefix, long block tables, metadata
// packed in one buffer, every kind of stream, two host threads at once). Every launch is waited for
// with a 10 s bound. The strict checks run with the cache in each KV layout.
#include "flash_wgmma_test_util.h"

namespace dbrx::cuda::test {
namespace {

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
            const bf16_t *k = p.cache.data() + kv_offset(p.kv(), blk, pos % p.bs, kvh);
            float *q = p.q.data() + (int64_t{t} * s.H + h) * s.hd;
            for (int32_t i = 0; i < s.hd; ++i) q[i] += 3.f * bf16_to_float(k[i]);
        }
    }
}

void poison_tails(Problem &p) {
    const KvLayer kv = p.kv();
    int32_t boff = 0;
    for (const Chunk &c : p.chunks) {
        const int32_t len = c.prefix + c.n_new, nb = (len + p.bs - 1) / p.bs;
        for (int32_t slot = len; slot < nb * p.bs; ++slot)
            for (int32_t h = 0; h < p.s.KV; ++h) {
                const int64_t off = kv_offset(kv, p.blocks[boff + slot / p.bs], slot % p.bs, h);
                const bf16_t big = 0x7f7f, nan = 0x7fc0;  // 3.39e38 and NaN
                for (int32_t i = 0; i < p.s.hd; ++i) {
                    const int64_t j = int64_t{h} * p.s.hd + i;  // the value's index in its slot
                    p.cache[off + i] = (slot + j) % 2 ? nan : big;
                    p.cache[off + kv.v_offset + i] = (slot + j) % 2 ? big : nan;
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
    p.cache.resize(static_cast<size_t>(p.n_blocks * p.kv().block_stride), 0x7fc0);
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
    worst.resize(1 + 2 * (1 + wgfa::variant_count()), 0.0);
    for (KvLayout layout : kKvLayouts) {
        DeviceProblem d(in_layout(p, layout));
        const std::string where = "H=" + std::to_string(s.H) + " KV=" + std::to_string(s.KV) + " prefix " +
                                  std::to_string(prefix) + " rows " + std::to_string(n) + " qmul " +
                                  std::to_string(qmul) + (peaked ? " peaked" : "") + " floor " + std::to_string(floor) +
                                  " " + kv_layout_name(layout) + " KV";
        const auto base = d.run(-2);
        worst[0] = std::max(worst[0], check_rows(p, base, ref, where + " flash_prefill vs cpu", floor));
        for (int32_t v = -1; v < wgfa::variant_count(); ++v) {
            const auto got = d.run(v);
            const size_t i = 1 + 2 * static_cast<size_t>(v + 1);
            worst[i] =
                std::max(worst[i], check_rows(p, got, ref, where + " " + DeviceProblem::name(v) + " vs cpu", floor));
            worst[i + 1] = std::max(worst[i + 1], check_rows(p, got, base,
                                                             where + " " + DeviceProblem::name(v) + " vs flash_prefill",
                                                             floor));
            EXPECT_TRUE(d.run(v) == got) << where << " " << DeviceProblem::name(v) << ": two runs differ";
        }
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
    if (visible_gpus() == 0) GTEST_SKIP() << "no CUDA device";
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

}  // namespace
}  // namespace dbrx::cuda::test
