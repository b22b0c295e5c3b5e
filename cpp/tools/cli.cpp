#include "cli.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace dbrx::cli {

void check(dbrx_status status, const char *what) {
    if (status != DBRX_OK) throw ApiError(status, std::string(what) + ": " + dbrx_last_error());
}

Args::Args(int argc, char **argv, int first, const std::vector<std::string> &flags) {
    for (int i = first; i < argc; ++i) {
        std::string a = argv[i];
        if (a.rfind("--", 0) != 0 || a.size() == 2) throw UsageError("unexpected argument '" + a + "'");
        std::string name = a.substr(2);
        auto eq = name.find('=');
        if (eq != std::string::npos) {
            values_[name.substr(0, eq)] = name.substr(eq + 1);
            continue;
        }
        bool is_flag = false;
        for (const auto &f : flags) is_flag |= (f == name);
        if (is_flag) {
            values_[name] = "true";
        } else {
            if (i + 1 >= argc) throw UsageError("option --" + name + " needs a value");
            values_[name] = argv[++i];
        }
    }
}

std::string Args::str(const std::string &name, const std::string &fallback) const {
    used_[name] = true;
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second;
}

std::string Args::required(const std::string &name) const {
    used_[name] = true;
    auto it = values_.find(name);
    if (it == values_.end() || it->second.empty()) throw UsageError("missing required option --" + name);
    return it->second;
}

int64_t Args::integer(const std::string &name, int64_t fallback, int64_t lo, int64_t hi) const {
    used_[name] = true;
    auto it = values_.find(name);
    if (it == values_.end()) return fallback;
    const char *s = it->second.c_str();
    char *end = nullptr;
    errno = 0;
    long long v = std::strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
        throw UsageError("--" + name + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                         "], got '" + it->second + "'");
    return v;
}

double Args::number(const std::string &name, double fallback) const {
    used_[name] = true;
    auto it = values_.find(name);
    if (it == values_.end()) return fallback;
    const char *s = it->second.c_str();
    char *end = nullptr;
    double v = std::strtod(s, &end);
    if (end == s || *end != '\0') throw UsageError("--" + name + " must be a number, got '" + it->second + "'");
    return v;  // range checks belong to the engine, which names the field
}

void Args::reject_unknown() const {
    for (const auto &[name, value] : values_)
        if (!used_.count(name)) throw UsageError("unknown option --" + name);
}

std::vector<int32_t> parse_ids(const std::string &text, const std::string &option) {
    std::vector<int32_t> ids;
    size_t pos = 0;
    while (pos <= text.size()) {
        size_t comma = text.find(',', pos);
        std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        char *end = nullptr;
        errno = 0;
        long long v = std::strtoll(item.c_str(), &end, 10);
        if (item.empty() || errno != 0 || *end != '\0' || v < INT32_MIN || v > INT32_MAX)
            throw UsageError(option + " must be a comma-separated list of token ids, bad item '" + item + "'");
        ids.push_back(static_cast<int32_t>(v));
        if (comma == std::string::npos) break;
        pos = comma + 1;
    }
    return ids;
}

LoadedModel::~LoadedModel() {
    dbrx_engine_free(engine);
    dbrx_model_free(model);
}

void load_model(const Args &args, dbrx_engine_params engine_params, LoadedModel &out) {
    load_model_only(args, out);
    check(dbrx_engine_create(out.model, &engine_params, &out.engine), "creating the engine");
}

void load_model_only(const Args &args, LoadedModel &out) {
    dbrx_model_params mp = dbrx_model_default_params();
    std::string device = args.str("device", "cpu");
    if (device == "cpu") {
        mp.device = DBRX_DEVICE_CPU;
    } else if (device == "cuda") {
        mp.device = DBRX_DEVICE_CUDA;
    } else {
        throw UsageError("--device must be cpu or cuda, got '" + device + "'");
    }
    mp.n_threads = static_cast<int32_t>(args.integer("threads", 0, 0, 4096));
    mp.tensor_parallel = static_cast<int32_t>(args.integer("tp", 1, 1, 1024));
    mp.expert_parallel = static_cast<int32_t>(args.integer("ep", 1, 1, 1024));
    mp.batch_invariant = args.str("batch-invariant") == "true";
    // Multi-GPU: --devices 0,1 (this process's GPUs), --rendezvous host:port, --nodes N, --node-rank R
    // (the last two default to the launcher's variables; the C API checks them all).
    if (args.has("devices")) {
        std::vector<int32_t> devices;
        try {
            devices = parse_ids(args.str("devices"), "--devices");
        } catch (const UsageError &) {
            throw UsageError("--devices must be a comma-separated list of CUDA device ordinals, e.g. 0,1; got '" +
                             args.str("devices") + "'");
        }
        if (devices.size() > DBRX_MAX_DEVICES)
            throw UsageError("--devices takes at most " + std::to_string(DBRX_MAX_DEVICES) + " GPUs");
        mp.n_devices = static_cast<int32_t>(devices.size());
        std::copy(devices.begin(), devices.end(), mp.devices);
    }
    const std::string rendezvous = args.str("rendezvous");
    mp.rendezvous = rendezvous.empty() ? nullptr : rendezvous.c_str();
    mp.n_nodes = static_cast<int32_t>(args.integer("nodes", -1, 1, 65536));
    mp.node_rank = static_cast<int32_t>(args.integer("node-rank", -1, 0, 65535));
    std::string dir = args.required("model");
    check(dbrx_model_load(dir.c_str(), &mp, &out.model), "loading the model");
    check(dbrx_model_get_info(out.model, &out.info), "reading the model info");
}

dbrx_sampling_params sampling_from_args(const Args &args) {
    dbrx_sampling_params sp = dbrx_sampling_default_params();
    sp.temperature = static_cast<float>(args.number("temperature", sp.temperature));
    sp.top_k = static_cast<int32_t>(args.integer("top-k", sp.top_k, INT32_MIN, INT32_MAX));
    sp.top_p = static_cast<float>(args.number("top-p", sp.top_p));
    sp.min_p = static_cast<float>(args.number("min-p", sp.min_p));
    sp.repetition_penalty = static_cast<float>(args.number("repetition-penalty", sp.repetition_penalty));
    sp.presence_penalty = static_cast<float>(args.number("presence-penalty", sp.presence_penalty));
    sp.frequency_penalty = static_cast<float>(args.number("frequency-penalty", sp.frequency_penalty));
    sp.max_tokens = static_cast<int32_t>(args.integer("max-tokens", sp.max_tokens, INT32_MIN, INT32_MAX));
    if (args.has("seed")) {
        sp.seed = static_cast<uint64_t>(args.integer("seed", 0, 0, INT64_MAX));
        sp.has_seed = true;
    }
    if (args.has("stop-ids")) {
        auto stops = parse_ids(args.str("stop-ids"), "--stop-ids");
        if (stops.size() > DBRX_MAX_STOP_IDS) throw UsageError("--stop-ids takes at most 16 ids");
        sp.n_stop_ids = static_cast<int32_t>(stops.size());
        for (size_t i = 0; i < stops.size(); ++i) sp.stop_ids[i] = stops[i];
    }
    if (args.has("ignore-eos")) {
        args.str("ignore-eos");
        sp.n_stop_ids = 0;
    }
    return sp;
}

}  // namespace dbrx::cli
