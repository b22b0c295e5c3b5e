#include "io/checkpoint.h"

#include <filesystem>
#include <map>
#include <set>

#include "io/read_file.h"
#include "io/strict_json.h"
#include "util/error.h"

namespace dbrx {

namespace {

namespace fs = std::filesystem;

constexpr const char *kSingleFile = "model.safetensors";
constexpr const char *kIndexFile = "model.safetensors.index.json";

std::string shape_text(const std::vector<int64_t> &shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// Shard names come from a stranger's index: they must name a file inside the checkpoint
// directory. The check is lexical on purpose, so symlinked shards (the HF cache layout) still load.
void check_shard_name(const std::string &index_path, const std::string &tensor, const std::string &shard) {
    auto reject = [&](const std::string &why) {
        bad_checkpoint(index_path + ": " + tensor + ": shard \"" + shard + "\" " + why);
    };
    if (shard.empty()) reject("is an empty file name");
    if (shard.find('\0') != std::string::npos) reject("contains a NUL character");
    fs::path p(shard);
    if (p.is_absolute() || shard.front() == '/') reject("is an absolute path; shards must lie inside the checkpoint directory");
    for (const auto &part : p)
        if (part == "..") reject("escapes the checkpoint directory");
}

// weight_map of the index: tensor name -> shard file name (validated).
std::map<std::string, std::string> read_index(const std::string &index_path) {
    nlohmann::json doc = parse_strict_json(read_file(index_path), index_path);
    if (!doc.is_object()) bad_checkpoint(index_path + ": header: not a JSON object");
    auto wm = doc.find("weight_map");
    if (wm == doc.end() || !wm->is_object()) bad_checkpoint(index_path + ": weight_map: missing or not an object");
    std::map<std::string, std::string> out;
    for (const auto &[tensor, shard] : wm->items()) {
        if (!shard.is_string()) bad_checkpoint(index_path + ": " + tensor + ": shard name must be a string");
        check_shard_name(index_path, tensor, shard.get<std::string>());
        out.emplace(tensor, shard.get<std::string>());
    }
    if (out.empty()) bad_checkpoint(index_path + ": weight_map: is empty");
    return out;
}

struct Located {
    const SafetensorsFile *shard;
    const TensorInfo *info;
    bool used = false;
};

// Binds the expected tensors by name, checking dtype, shape and alignment of each.
class Binder {
public:
    Binder(const std::string &dir, std::map<std::string, Located> &tensors) : dir_(dir), tensors_(tensors) {}

    const bf16_t *bind(const std::string &name, std::vector<int64_t> shape) {
        auto it = tensors_.find(name);
        if (it == tensors_.end())
            bad_checkpoint(dir_ + ": " + name + ": missing tensor (expected BF16 " + shape_text(shape) + ")");
        Located &t = it->second;
        const std::string where = t.shard->path() + ": " + name + ": ";
        if (t.info->dtype != DType::BF16)
            bad_checkpoint(where + "dtype is " + dtype_name(t.info->dtype) + ", expected BF16");
        if (t.info->shape != shape)
            bad_checkpoint(where + "shape is " + shape_text(t.info->shape) + ", expected " + shape_text(shape));
        const uint8_t *p = t.shard->data(*t.info);
        if (reinterpret_cast<uintptr_t>(p) % alignof(bf16_t) != 0)
            bad_checkpoint(where + "data is not 2-byte aligned (the header length is odd)");
        t.used = true;
        bytes_ += static_cast<int64_t>(t.info->end - t.info->begin);
        return reinterpret_cast<const bf16_t *>(p);
    }

    // The format does not forbid NaN/Inf; one in a norm or router weight poisons every token, so
    // these small tensors are scanned (the big matrices are left to the numerics).
    const bf16_t *bind_finite(const std::string &name, std::vector<int64_t> shape) {
        const bf16_t *p = bind(name, shape);
        const int64_t n = tensors_.at(name).info->numel();
        for (int64_t i = 0; i < n; ++i)
            if ((p[i] & 0x7f80u) == 0x7f80u)
                bad_checkpoint(tensors_.at(name).shard->path() + ": " + name + ": holds a non-finite value at element " +
                               std::to_string(i));
        return p;
    }

    int64_t bytes() const { return bytes_; }

private:
    const std::string &dir_;
    std::map<std::string, Located> &tensors_;
    int64_t bytes_ = 0;
};

}  // namespace

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string &dir) {
    std::unique_ptr<Checkpoint> ck(new Checkpoint());
    ck->dir_ = dir;
    ck->config_ = load_model_config(dir);
    const ModelConfig &c = ck->config_;

    // Every tensor of every shard, checked for duplicates across shards and against the index.
    std::map<std::string, Located> tensors;
    auto add_shard = [&](const std::string &path) {
        ck->shards_.push_back(std::make_unique<SafetensorsFile>(path));
        const SafetensorsFile &shard = *ck->shards_.back();
        for (const TensorInfo &t : shard.tensors()) {
            auto [it, fresh] = tensors.emplace(t.name, Located{&shard, &t});
            if (!fresh)
                bad_checkpoint(shard.path() + ": " + t.name + ": also defined in " + it->second.shard->path());
        }
    };

    const fs::path single = fs::path(dir) / kSingleFile, index = fs::path(dir) / kIndexFile;
    std::error_code ec;
    if (fs::exists(single, ec)) {
        add_shard(single.string());
    } else if (fs::exists(index, ec)) {
        const auto weight_map = read_index(index.string());
        std::set<std::string> shard_names;
        for (const auto &[tensor, shard] : weight_map) shard_names.insert(shard);
        for (const auto &shard : shard_names) add_shard((fs::path(dir) / shard).string());
        for (const auto &[tensor, shard] : weight_map) {
            auto it = tensors.find(tensor);
            const std::string shard_path = (fs::path(dir) / shard).string();
            if (it == tensors.end() || it->second.shard->path() != shard_path)
                bad_checkpoint(index.string() + ": " + tensor + ": the index puts it in " + shard + ", which does not contain it");
        }
        for (const auto &[name, t] : tensors)
            if (!weight_map.count(name))
                bad_checkpoint(t.shard->path() + ": " + name + ": tensor is not listed in " + kIndexFile);
    } else {
        fail(DBRX_ERR_IO, dir + ": no " + kSingleFile + " or " + kIndexFile + " found");
    }

    const int64_t d = c.d_model, vocab = c.vocab_size, expert_rows = int64_t{c.n_experts} * c.ffn_hidden;
    Binder b(dir, tensors);
    ModelWeights &w = ck->weights_;
    w.wte = b.bind("transformer.wte.weight", {vocab, d});
    w.norm_f = b.bind_finite("transformer.norm_f.weight", {d});
    w.lm_head = b.bind("lm_head.weight", {vocab, d});
    // push_back per layer: a hostile n_layers fails at the first missing tensor, before any big allocation.
    for (int32_t i = 0; i < c.n_layers; ++i) {
        const std::string p = "transformer.blocks." + std::to_string(i) + ".";
        LayerWeights l;
        l.norm_1 = b.bind_finite(p + "norm_attn_norm.norm_1.weight", {d});
        l.wqkv = b.bind(p + "norm_attn_norm.attn.Wqkv.weight", {c.qkv_rows(), d});
        l.out_proj = b.bind(p + "norm_attn_norm.attn.out_proj.weight", {d, d});
        l.norm_2 = b.bind_finite(p + "norm_attn_norm.norm_2.weight", {d});
        l.router = b.bind_finite(p + "ffn.router.layer.weight", {c.n_experts, d});
        l.w1 = b.bind(p + "ffn.experts.mlp.w1", {expert_rows, d});
        l.v1 = b.bind(p + "ffn.experts.mlp.v1", {expert_rows, d});
        l.w2 = b.bind(p + "ffn.experts.mlp.w2", {expert_rows, d});
        w.layers.push_back(l);
    }
    for (const auto &[name, t] : tensors)
        if (!t.used)
            bad_checkpoint(t.shard->path() + ": " + name + ": unexpected tensor (not part of a DBRX model with n_layers=" +
                           std::to_string(c.n_layers) + ")");
    ck->weight_bytes_ = b.bytes();
    return ck;
}

}  // namespace dbrx
