// dbrx eval: run every case of a reference.json through the engine and write the prompt's
// last-position logits and the greedy continuation of each, in input order:
//   {"cases":[{"last_logits":[...],"greedy_ids":[...]}], "stats":{...}}
// --concurrency N keeps up to N cases in flight, --kv-blocks N shrinks the KV pool (forcing
// preemption), --repeat K runs all cases K times (exercising the prefix cache).
#include <cstdio>
#include <deque>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli.h"

namespace dbrx::cli {
namespace {

struct Case {
    std::vector<int32_t> prompt;
    int32_t n_greedy = 0;
};

std::vector<Case> read_cases(const std::string &path) {
    std::ifstream in(path);
    if (!in) throw ApiError(DBRX_ERR_IO, "cannot open --cases file " + path);
    nlohmann::json j;
    try {
        in >> j;
    } catch (const std::exception &e) {
        throw ApiError(DBRX_ERR_INVALID_ARGUMENT, path + ": not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("cases") || !j["cases"].is_array())
        throw ApiError(DBRX_ERR_INVALID_ARGUMENT, path + ": expected an object with a \"cases\" array");
    std::vector<Case> cases;
    for (size_t i = 0; i < j["cases"].size(); ++i) {
        const auto &c = j["cases"][i];
        std::string where = path + ": cases[" + std::to_string(i) + "]";
        if (!c.is_object() || !c.contains("prompt_ids") || !c["prompt_ids"].is_array())
            throw ApiError(DBRX_ERR_INVALID_ARGUMENT, where + ": missing prompt_ids array");
        Case out;
        for (const auto &id : c["prompt_ids"]) {
            if (!id.is_number_integer()) throw ApiError(DBRX_ERR_INVALID_ARGUMENT, where + ": prompt_ids must be integers");
            out.prompt.push_back(id.get<int32_t>());
        }
        out.n_greedy = c.contains("greedy_ids") && c["greedy_ids"].is_array() ? static_cast<int32_t>(c["greedy_ids"].size()) : 1;
        if (out.n_greedy < 1) out.n_greedy = 1;
        cases.push_back(std::move(out));
    }
    return cases;
}

struct Result {
    std::vector<float> last_logits;
    std::vector<int32_t> ids;
};

struct InFlight {
    size_t slot;
    uint64_t id;
};

// Drains one request's new tokens, waiting up to timeout_ms; true when it finished.
bool drain(dbrx_engine *engine, const InFlight &f, Result &r, int32_t n_vocab, int32_t timeout_ms) {
    dbrx_token tokens[64];
    int32_t n = 0;
    dbrx_finish_reason finish = DBRX_FINISH_NONE;
    dbrx_status s = dbrx_engine_poll(engine, f.id, timeout_ms, tokens, 64, &n, &finish);
    if (s == DBRX_ERR_TIMEOUT) return false;
    check(s, "polling a case");
    for (int32_t i = 0; i < n; ++i) r.ids.push_back(tokens[i].id);
    if (finish == DBRX_FINISH_NONE) return false;
    if (finish == DBRX_FINISH_ERROR || finish == DBRX_FINISH_CANCELLED)
        throw ApiError(DBRX_ERR_INTERNAL, "case " + std::to_string(f.slot) + " failed: " + dbrx_last_error());
    r.last_logits.resize(n_vocab);
    check(dbrx_engine_get_prompt_logits(engine, f.id, r.last_logits.data(), n_vocab), "reading the prompt logits");
    check(dbrx_engine_release(engine, f.id), "releasing a case");
    return true;
}

}  // namespace

int cmd_eval(int argc, char **argv) {
    Args args(argc, argv, 2, {"batch-invariant"});
    std::vector<Case> cases = read_cases(args.required("cases"));
    std::string out_path = args.required("out");
    int64_t concurrency = args.integer("concurrency", 1, 1, 4096);
    int64_t repeat = args.integer("repeat", 1, 1, 1000);
    dbrx_engine_params ep = dbrx_engine_default_params();
    ep.kv_blocks = static_cast<int32_t>(args.integer("kv-blocks", 0, 0, INT32_MAX));
    LoadedModel m;
    load_model(args, ep, m);
    args.reject_unknown();

    const size_t total = cases.size() * static_cast<size_t>(repeat);
    std::vector<Result> results(total);
    std::deque<InFlight> flying;
    size_t next = 0;
    while (next < total || !flying.empty()) {
        while (next < total && flying.size() < static_cast<size_t>(concurrency)) {
            const Case &c = cases[next % cases.size()];
            dbrx_sampling_params sp = dbrx_sampling_default_params();  // greedy
            sp.max_tokens = c.n_greedy;
            sp.n_stop_ids = 0;  // the reference continues through eos
            sp.keep_prompt_logits = true;
            uint64_t id = 0;
            check(dbrx_engine_submit(m.engine, c.prompt.data(), static_cast<int32_t>(c.prompt.size()), &sp, &id),
                  ("submitting case " + std::to_string(next % cases.size())).c_str());
            flying.push_back({next++, id});
        }
        // Wait on the oldest, then sweep the rest without waiting.
        if (drain(m.engine, flying.front(), results[flying.front().slot], m.info.n_vocab, 1000)) flying.pop_front();
        for (auto it = flying.begin(); it != flying.end();) {
            if (drain(m.engine, *it, results[it->slot], m.info.n_vocab, 0)) {
                it = flying.erase(it);
            } else {
                ++it;
            }
        }
    }

    dbrx_engine_stats st{};
    check(dbrx_engine_get_stats(m.engine, &st), "reading engine stats");
    std::FILE *f = std::fopen(out_path.c_str(), "w");
    if (!f) throw ApiError(DBRX_ERR_IO, "cannot write --out file " + out_path);
    std::fputs("{\"cases\":[", f);
    for (size_t i = 0; i < total; ++i) {
        std::fputs(i ? ",{\"last_logits\":[" : "{\"last_logits\":[", f);
        for (size_t v = 0; v < results[i].last_logits.size(); ++v) std::fprintf(f, v ? ",%.9g" : "%.9g", results[i].last_logits[v]);
        std::fputs("],\"greedy_ids\":[", f);
        for (size_t k = 0; k < results[i].ids.size(); ++k) std::fprintf(f, k ? ",%d" : "%d", results[i].ids[k]);
        std::fputs("]}", f);
    }
    std::fprintf(f,
                 "],\"stats\":{\"preemptions\":%lld,\"prefix_hit_tokens\":%lld,\"prefix_query_tokens\":%lld,"
                 "\"steps\":%lld,\"blocks_total\":%d}}\n",
                 static_cast<long long>(st.preemptions), static_cast<long long>(st.prefix_hit_tokens),
                 static_cast<long long>(st.prefix_query_tokens), static_cast<long long>(st.steps), st.blocks_total);
    if (std::fclose(f) != 0) throw ApiError(DBRX_ERR_IO, "cannot write --out file " + out_path);
    std::fprintf(stderr, "dbrx eval: %zu cases, %lld steps, %lld preemptions, prefix cache %lld/%lld tokens\n", total,
                 static_cast<long long>(st.steps), static_cast<long long>(st.preemptions),
                 static_cast<long long>(st.prefix_hit_tokens), static_cast<long long>(st.prefix_query_tokens));
    return 0;
}

}  // namespace dbrx::cli
