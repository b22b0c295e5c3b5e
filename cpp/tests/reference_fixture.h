// Loading the float64 reference of a fixture directory (shared/fixtures/README.md): the cases of
// reference.json (prompt, greedy ids, greedy margins) and the F32 tensors of reference.safetensors
// ("case<i>.last_logits", "case<i>.logits"), next to the checkpoint they were computed from.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "io/safetensors.h"

namespace dbrx::testing {

struct RefCase {
    std::vector<int32_t> prompt, greedy;
    std::vector<double> margins;
};

inline std::vector<RefCase> load_ref_cases(const std::string &dir) {
    std::ifstream in(dir + "/reference.json");
    auto j = nlohmann::json::parse(in);
    std::vector<RefCase> cases;
    for (const auto &c : j.at("cases"))
        cases.push_back({c.at("prompt_ids").get<std::vector<int32_t>>(), c.at("greedy_ids").get<std::vector<int32_t>>(),
                         c.at("greedy_margins").get<std::vector<double>>()});
    return cases;
}

// Reference tensor `name` (F32) as floats; empty when absent.
inline std::vector<float> ref_tensor(const SafetensorsFile &ref, const std::string &name) {
    const TensorInfo *t = ref.find(name);
    if (!t) return {};
    EXPECT_EQ(t->dtype, DType::F32) << name;
    std::vector<float> out(static_cast<size_t>(t->numel()));
    std::memcpy(out.data(), ref.data(*t), out.size() * sizeof(float));
    return out;
}

// A fixture's checkpoint with its reference cases and tensors.
struct ReferenceFixture {
    std::unique_ptr<Checkpoint> ckpt;
    std::vector<RefCase> cases;
    std::unique_ptr<SafetensorsFile> ref;

    explicit ReferenceFixture(const std::string &dir)
        : ckpt(Checkpoint::open(dir)), cases(load_ref_cases(dir)),
          ref(std::make_unique<SafetensorsFile>(dir + "/reference.safetensors")) {}
    int32_t vocab() const { return ckpt->config().vocab_size; }
    std::vector<float> tensor(const std::string &name) const { return ref_tensor(*ref, name); }
    // Case i's last-position logits, which every fixture has.
    std::vector<float> last_logits(size_t i) const {
        std::vector<float> t = tensor("case" + std::to_string(i) + ".last_logits");
        EXPECT_FALSE(t.empty()) << "no reference logits for case " << i;
        return t;
    }
};

}  // namespace dbrx::testing
