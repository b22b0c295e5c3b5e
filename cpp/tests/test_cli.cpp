// The dbrx tool end to end: `dbrx eval` against the float64 references of both fixtures (the
// conformance gate of the CPU backend), engine modes that must not change results, exit codes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::vector<std::string> kFixtures = {DBRX_SOURCE_DIR "/fixtures/tiny-dbrx", DBRX_SOURCE_DIR "/models/tiny-dbrx-cl100k"};

struct CliRun {
    int exit_code;
    std::string out;  // stdout
    std::string err;  // stderr
};

std::string slurp(const fs::path &p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

CliRun run_cli(const std::string &args) {
    static int counter = 0;
    fs::path dir = fs::temp_directory_path() / ("dbrx_cli_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(dir);
    std::string cmd = std::string(DBRX_CLI_PATH) + " " + args + " >" + (dir / "out").string() + " 2>" + (dir / "err").string();
    int status = std::system(cmd.c_str());
    CliRun r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir / "out"), slurp(dir / "err")};
    fs::remove_all(dir);
    return r;
}

json eval(const std::string &model, const std::string &extra = "") {
    fs::path out = fs::temp_directory_path() / ("dbrx_eval_" + std::to_string(::getpid()) + ".json");
    CliRun r = run_cli("eval --model " + model + " --cases " + model + "/reference.json --out " + out.string() + " " + extra);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    json j = r.exit_code == 0 ? json::parse(slurp(out)) : json::object();
    fs::remove(out);
    return j;
}

json reference(const std::string &model) { return json::parse(slurp(model + "/reference.json")); }

std::vector<float> reference_last_logits(const std::string &model, size_t i) {
    dbrx::SafetensorsFile ref(model + "/reference.safetensors");
    const dbrx::TensorInfo *t = ref.find("case" + std::to_string(i) + ".last_logits");
    if (!t) throw std::runtime_error("no reference logits for case " + std::to_string(i));
    const float *p = reinterpret_cast<const float *>(ref.data(*t));
    return std::vector<float>(p, p + t->numel());
}

// Same token ids and logits (within tol) case by case, `b` possibly holding several rounds of `a`.
void expect_same_results(const json &a, const json &b, double tol) {
    ASSERT_EQ(b["cases"].size() % a["cases"].size(), 0u);
    for (size_t i = 0; i < b["cases"].size(); ++i) {
        const json &x = a["cases"][i % a["cases"].size()], &y = b["cases"][i];
        EXPECT_EQ(x["greedy_ids"], y["greedy_ids"]) << "case " << i;
        ASSERT_EQ(x["last_logits"].size(), y["last_logits"].size());
        double worst = 0;
        for (size_t v = 0; v < x["last_logits"].size(); ++v)
            worst = std::max(worst, std::fabs(x["last_logits"][v].get<double>() - y["last_logits"][v].get<double>()));
        EXPECT_LE(worst, tol) << "case " << i;
    }
}

}  // namespace

TEST(CliEval, MatchesTheFloat64ReferenceOnBothFixtures) {
    for (const auto &model : kFixtures) {
        json ref = reference(model), got = eval(model);
        ASSERT_EQ(got["cases"].size(), ref["cases"].size()) << model;
        for (size_t i = 0; i < ref["cases"].size(); ++i) {
            std::vector<float> want = reference_last_logits(model, i);
            const json &logits = got["cases"][i]["last_logits"];
            ASSERT_EQ(logits.size(), want.size());
            double worst = 0;
            for (size_t v = 0; v < want.size(); ++v) worst = std::max(worst, std::fabs(logits[v].get<double>() - want[v]));
            EXPECT_LE(worst, 2e-3) << model << " case " << i;
            std::printf("%s case %zu: max |logit - ref| = %.3g\n", fs::path(model).filename().c_str(), i, worst);

            const json &want_ids = ref["cases"][i]["greedy_ids"], &margins = ref["cases"][i]["greedy_margins"];
            const json &ids = got["cases"][i]["greedy_ids"];
            ASSERT_EQ(ids.size(), want_ids.size());
            for (size_t k = 0; k < want_ids.size(); ++k) {
                if (margins[k].get<double>() < 1e-2) break;  // below the tolerance the reference itself is ambiguous
                ASSERT_EQ(ids[k], want_ids[k]) << model << " case " << i << " step " << k;
            }
        }
    }
}

TEST(CliEval, ConcurrencyPreemptionAndPrefixCacheDoNotChangeResults) {
    for (const auto &model : kFixtures) {
        json alone = eval(model);
        json together = eval(model, "--concurrency 8");
        expect_same_results(alone, together, 1e-5);

        // Eight copies of a case whose prompt fits one block of 16 but whose continuation needs a
        // second: a pool of 8 blocks admits all eight prompts, then must preempt to let them grow.
        json ref = reference(model);
        size_t pick = ref["cases"].size();
        for (size_t i = 0; i < ref["cases"].size() && pick == ref["cases"].size(); ++i) {
            size_t p = ref["cases"][i]["prompt_ids"].size(), g = ref["cases"][i]["greedy_ids"].size();
            if (p <= 16 && p + g > 16) pick = i;
        }
        ASSERT_LT(pick, ref["cases"].size()) << model;
        json copies = {{"cases", json::array()}};
        for (int k = 0; k < 8; ++k) copies["cases"].push_back(ref["cases"][pick]);
        fs::path cases_file = fs::temp_directory_path() / ("dbrx_copies_" + std::to_string(::getpid()) + ".json");
        std::ofstream(cases_file) << copies.dump();
        fs::path out = fs::temp_directory_path() / ("dbrx_squeezed_" + std::to_string(::getpid()) + ".json");
        CliRun r = run_cli("eval --model " + model + " --cases " + cases_file.string() + " --out " + out.string() +
                        " --concurrency 8 --kv-blocks 8");
        ASSERT_EQ(r.exit_code, 0) << r.err;
        json squeezed = json::parse(slurp(out));
        fs::remove(out);
        fs::remove(cases_file);
        json one = {{"cases", json::array({alone["cases"][pick]})}};
        expect_same_results(one, squeezed, 1e-5);
        EXPECT_GT(squeezed["stats"]["preemptions"].get<int64_t>(), 0) << model;

        json repeated = eval(model, "--concurrency 2 --repeat 3");
        ASSERT_EQ(repeated["cases"].size(), 3 * alone["cases"].size());
        expect_same_results(alone, repeated, 1e-5);
        EXPECT_GT(repeated["stats"]["prefix_hit_tokens"].get<int64_t>(), 0) << model;
    }
}

TEST(CliGenerate, PrintsTheGreedyContinuation) {
    const std::string model = kFixtures[0];
    json c = reference(model)["cases"][2];
    std::string prompt;
    for (const auto &id : c["prompt_ids"]) prompt += (prompt.empty() ? "" : ",") + std::to_string(id.get<int>());
    CliRun r = run_cli("generate --model " + model + " --prompt-ids " + prompt + " --max-tokens 3");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::vector<int> ids;
    for (std::istringstream in(r.out); !in.eof();) {
        int id;
        if (in >> id) ids.push_back(id);
    }
    ASSERT_EQ(ids.size(), 3u) << r.out;
    for (size_t k = 0; k < 3 && c["greedy_margins"][k].get<double>() >= 1e-2; ++k) EXPECT_EQ(ids[k], c["greedy_ids"][k]);
}

TEST(CliErrors, OneLineOnStderrAndTheDocumentedExitCode) {
    const std::string model = kFixtures[0];
    struct Case {
        std::string args;
        int code;
        std::string needle;
    } cases[] = {
        {"generate --model /nonexistent/dir --prompt-ids 1", 2, "/nonexistent/dir"},
        {"generate --model " + model + " --prompt-ids 1,x", 2, "--prompt-ids"},
        {"generate --model " + model + " --prompt-ids 99999", 2, "vocab"},
        {"generate --model " + model + " --prompt-ids 1 --temperature -1", 2, "temperature"},
        {"generate --model " + model + " --prompt-ids 1 --max-tokens 0", 2, "max_tokens"},
        {"generate --model " + model + " --prompt-ids 1 --device tpu", 2, "--device"},
        {"generate --model " + model + " --prompt-ids 1 --bogus 1", 2, "--bogus"},
        {"eval --model " + model + " --cases /nonexistent.json --out /tmp/x.json", 2, "/nonexistent.json"},
        {"frobnicate", 2, "unknown command"},
    };
    for (const auto &c : cases) {
        CliRun r = run_cli(c.args);
        EXPECT_EQ(r.exit_code, c.code) << c.args << "\n" << r.err;
        EXPECT_NE(r.err.find(c.needle), std::string::npos) << c.args << "\n" << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
    }
}

TEST(CliEval, TensorAndExpertParallelMatchOneRank) {
    for (const auto &model : kFixtures) {
        json alone = eval(model);
        expect_same_results(alone, eval(model, "--tp 2"), 1e-5);
        expect_same_results(alone, eval(model, "--ep 2"), 1e-5);
    }
}

TEST(CliEval, BatchInvariantFlagReachesTheModel) {
    const std::string model = kFixtures[0];
    // The CPU backend is batch-invariant either way: the flag must load and change nothing.
    expect_same_results(eval(model), eval(model, "--batch-invariant --concurrency 4"), 0.0);
    CliRun r = run_cli("eval --model " + model + " --cases " + model + "/reference.json --out /dev/null " +
                       "--device cuda --tp 2 --batch-invariant");
    EXPECT_EQ(r.exit_code, 2) << r.err;  // refused before any GPU is needed
    EXPECT_NE(r.err.find("batch_invariant"), std::string::npos) << r.err;
}
