// Test helpers that write safetensors files, valid ones and deliberately broken ones, into a
// temporary directory that is removed when the test ends.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace dbrx::iotest {

// A fresh directory under the system temp dir, deleted with everything in it on destruction.
class TempDir {
public:
    TempDir() {
        std::random_device rd;
        path_ = std::filesystem::temp_directory_path() /
                ("dbrx-io-test-" + std::to_string(rd()) + "-" + std::to_string(rd()));
        std::filesystem::create_directories(path_);
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    TempDir(const TempDir &) = delete;
    TempDir &operator=(const TempDir &) = delete;
    std::string str() const { return path_.string(); }
    std::string file(const std::string &name) const { return (path_ / name).string(); }

private:
    std::filesystem::path path_;
};

inline void write_file(const std::string &path, const std::string &bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good()) << "cannot write " << path;
}

// The on-disk image: u64 little-endian header length, header text, data bytes.
inline std::string raw_safetensors(const std::string &header, const std::string &data = "") {
    std::string out(8, '\0');
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    return out + header + data;
}

inline size_t test_dtype_size(const std::string &dtype) {
    if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
    if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
    if (dtype == "BF16" || dtype == "F16" || dtype == "I16" || dtype == "U16") return 2;
    return 1;
}

struct TestTensor {
    std::string name;
    std::vector<int64_t> shape;
    std::string dtype = "BF16";
    uint8_t fill = 0;  // every data byte of the tensor
};

// A valid file: tensors laid out back to back in the given order; the header is padded with
// spaces to a multiple of 8 (as the reference writer does) unless `pad` is false.
inline std::string make_safetensors(const std::vector<TestTensor> &tensors, const nlohmann::json &metadata = nullptr,
                                    bool pad = true) {
    nlohmann::json header = nlohmann::json::object();
    std::string data;
    for (const auto &t : tensors) {
        uint64_t bytes = test_dtype_size(t.dtype);
        for (int64_t d : t.shape) bytes *= static_cast<uint64_t>(d);
        header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + bytes}}};
        data.append(bytes, static_cast<char>(t.fill));
    }
    if (!metadata.is_null()) header["__metadata__"] = metadata;
    std::string text = header.dump();
    if (pad) text.append((8 - text.size() % 8) % 8, ' ');
    return raw_safetensors(text, data);
}

// Runs `fn`, expecting dbrx::Error with `status` whose message contains `needle`.
template <typename Fn>
void expect_error(Fn &&fn, dbrx_status status, const std::string &needle) {
    try {
        fn();
        ADD_FAILURE() << "no error thrown; expected one containing \"" << needle << "\"";
    } catch (const dbrx::Error &e) {
        EXPECT_EQ(e.status(), status) << e.what();
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
            << "message \"" << e.what() << "\" lacks \"" << needle << "\"";
    }
}

}  // namespace dbrx::iotest
