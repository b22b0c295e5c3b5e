#include "io/model_config.h"

#include <cmath>
#include <filesystem>
#include <limits>

#include "io/read_file.h"
#include "io/strict_json.h"
#include "util/error.h"

namespace dbrx {

namespace {

using nlohmann::json;

// Reads fields of one JSON object, naming "<file>: <key path>" in every error.
class Fields {
public:
    Fields(const json &obj, std::string file, std::string prefix)
        : obj_(obj), file_(std::move(file)), prefix_(std::move(prefix)) {}

    [[noreturn]] void reject(const std::string &key, const std::string &rule, dbrx_status st = DBRX_ERR_BAD_CHECKPOINT) const {
        fail(st, file_ + ": " + prefix_ + key + ": " + rule);
    }

    const json *find(const std::string &key) const {
        auto it = obj_.find(key);
        return it == obj_.end() ? nullptr : &*it;
    }

    const json &need(const std::string &key) const {
        const json *v = find(key);
        if (!v) reject(key, "missing");
        return *v;
    }

    int32_t positive_int(const std::string &key) const {
        const json &v = need(key);
        if (!v.is_number_integer()) reject(key, "must be an integer, found " + v.dump());
        if (v.is_number_unsigned() ? v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())
                                   : v.get<int64_t>() > std::numeric_limits<int32_t>::max())
            reject(key, "value " + v.dump() + " is too large");
        int64_t x = v.get<int64_t>();
        if (x <= 0) reject(key, "must be positive, found " + v.dump());
        return static_cast<int32_t>(x);
    }

    // Absent -> `absent`; null -> nullopt; otherwise a finite number > 0.
    std::optional<double> nullable_positive(const std::string &key, std::optional<double> absent) const {
        const json *v = find(key);
        if (!v) return absent;
        if (v->is_null()) return std::nullopt;
        return positive_number(key, *v);
    }

    double positive_number(const std::string &key, const json &v) const {
        if (!v.is_number()) reject(key, "must be a number, found " + v.dump());
        double x = v.get<double>();
        if (!std::isfinite(x) || x <= 0) reject(key, "must be a positive finite number, found " + v.dump());
        return x;
    }

    const json &object(const std::string &key) const {
        const json &v = need(key);
        if (!v.is_object()) reject(key, "must be an object");
        return v;
    }

    const std::string &file() const { return file_; }

private:
    const json &obj_;
    std::string file_;
    std::string prefix_;
};

void read_attn(const Fields &attn, ModelConfig &c) {
    c.n_kv_heads = attn.positive_int("kv_n_heads");
    auto clip = attn.nullable_positive("clip_qkv", std::nullopt);
    if (clip) {
        if (*clip > std::numeric_limits<float>::max()) attn.reject("clip_qkv", "is too large for fp32");
        c.clip_qkv = static_cast<float>(*clip);
    }
    if (const json *theta = attn.find("rope_theta"))
        c.rope_theta = attn.positive_number("rope_theta", *theta);
    else
        c.rope_theta = 10000.0;  // DbrxAttentionConfig's default
}

void read_ffn(const Fields &ffn, ModelConfig &c) {
    c.ffn_hidden = ffn.positive_int("ffn_hidden_size");
    c.n_experts = ffn.positive_int("moe_num_experts");
    c.top_k = ffn.positive_int("moe_top_k");
    c.moe_norm_p = ffn.nullable_positive("moe_normalize_expert_weights", 1.0);
    if (const json *act = ffn.find("ffn_act_fn")) {
        if (!act->is_object()) ffn.reject("ffn_act_fn", "must be an object like {\"name\": \"silu\"}");
        auto name = act->find("name");
        if (name != act->end()) {
            if (!name->is_string()) ffn.reject("ffn_act_fn.name", "must be a string");
            if (*name != "silu")
                ffn.reject("ffn_act_fn.name", "activation " + name->dump() + " is not supported (only silu)",
                           DBRX_ERR_UNSUPPORTED);
        }
    }
}

void check_consistency(const Fields &top, const ModelConfig &c) {
    if (c.d_model % c.n_heads != 0)
        top.reject("d_model", std::to_string(c.d_model) + " is not divisible by n_heads " + std::to_string(c.n_heads));
    if (c.n_heads % c.n_kv_heads != 0)
        top.reject("attn_config.kv_n_heads",
                   std::to_string(c.n_kv_heads) + " does not divide n_heads " + std::to_string(c.n_heads));
    if (c.top_k > c.n_experts)
        top.reject("ffn_config.moe_top_k",
                   std::to_string(c.top_k) + " exceeds moe_num_experts " + std::to_string(c.n_experts));
    // Derived sizes are int32 in the model; a config that overflows them cannot be a real model.
    int64_t qkv = int64_t{c.d_model} + 2 * int64_t{c.n_kv_heads} * c.head_dim;
    int64_t expert_rows = int64_t{c.n_experts} * c.ffn_hidden;
    if (qkv > std::numeric_limits<int32_t>::max()) top.reject("d_model", "fused QKV width overflows int32");
    if (expert_rows > std::numeric_limits<int32_t>::max())
        top.reject("ffn_config.ffn_hidden_size", "moe_num_experts * ffn_hidden_size overflows int32");
}

std::vector<int32_t> read_eos(const std::string &generation_json, const std::string &where, int32_t vocab) {
    std::vector<int32_t> ids;
    if (generation_json.empty()) return ids;
    json gen = parse_strict_json(generation_json, where);
    if (!gen.is_object()) bad_checkpoint(where + ": not a JSON object");
    Fields f(gen, where, "");
    const json *eos = f.find("eos_token_id");
    if (!eos || eos->is_null()) return ids;
    auto add = [&](const json &v) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab)
            f.reject("eos_token_id", "must hold token ids in [0, " + std::to_string(vocab) + "), found " + v.dump());
        ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    };
    if (eos->is_array()) {
        for (const auto &v : *eos) add(v);
    } else if (eos->is_number()) {
        add(*eos);
    } else {
        f.reject("eos_token_id", "must be an integer, a list of integers or null, found " + eos->dump());
    }
    return ids;
}

}  // namespace

ModelConfig parse_model_config(const std::string &config_json, const std::string &generation_json,
                               const std::string &where) {
    const std::string config_where = where + "/config.json";
    json doc = parse_strict_json(config_json, config_where);
    if (!doc.is_object()) bad_checkpoint(config_where + ": not a JSON object");
    Fields top(doc, config_where, "");

    ModelConfig c;
    c.d_model = top.positive_int("d_model");
    c.n_heads = top.positive_int("n_heads");
    c.n_layers = top.positive_int("n_layers");
    c.max_seq_len = top.positive_int("max_seq_len");
    c.vocab_size = top.positive_int("vocab_size");
    if (const json *tie = top.find("tie_word_embeddings")) {
        if (!tie->is_boolean()) top.reject("tie_word_embeddings", "must be a boolean");
        if (tie->get<bool>()) top.reject("tie_word_embeddings", "tied embeddings are not supported by DBRX", DBRX_ERR_UNSUPPORTED);
    }
    // Unknown keys (including junk such as tie_word_embeddings inside the sub-configs) are ignored.
    read_attn(Fields(top.object("attn_config"), config_where, "attn_config."), c);
    read_ffn(Fields(top.object("ffn_config"), config_where, "ffn_config."), c);
    c.head_dim = c.d_model / c.n_heads;
    check_consistency(top, c);

    c.eos_ids = read_eos(generation_json, where + "/generation_config.json", c.vocab_size);
    return c;
}

ModelConfig load_model_config(const std::string &dir) {
    namespace fs = std::filesystem;
    std::string config = read_file((fs::path(dir) / "config.json").string());
    std::string generation;
    fs::path gen_path = fs::path(dir) / "generation_config.json";
    std::error_code ec;
    if (fs::exists(gen_path, ec)) {
        generation = read_file(gen_path.string());
        // An empty file would otherwise read as "absent".
        if (generation.empty()) bad_checkpoint(gen_path.string() + ": empty file");
    }
    return parse_model_config(config, generation, dir);
}

}  // namespace dbrx
