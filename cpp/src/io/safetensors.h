// Strict safetensors reader: the header is validated completely before any tensor is touched,
// because checkpoints come from strangers. Data stays in the mmapped file (never copied).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace dbrx {

enum class DType { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

const char *dtype_name(DType t);
size_t dtype_size(DType t);

struct TensorInfo {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0;  // byte offsets relative to the start of the data section
    uint64_t end = 0;
    int64_t numel() const;
};

struct SafetensorsHeader {
    std::vector<TensorInfo> tensors;  // in file order of data_offsets
    std::map<std::string, std::string> metadata;
    uint64_t data_start = 0;          // 8 + header length
};

// Validates a whole safetensors image held in memory (buf, size = the file size).
// `label` names the file in error messages. Throws dbrx::Error(DBRX_ERR_BAD_CHECKPOINT)
// with "<label>: <tensor>: <rule>" text on any violation; never reads out of bounds.
SafetensorsHeader parse_safetensors(const uint8_t *buf, uint64_t size, const std::string &label);

// Read-only memory map of a file (RAII).
class MappedFile {
public:
    explicit MappedFile(const std::string &path);  // throws DBRX_ERR_IO
    ~MappedFile();
    MappedFile(const MappedFile &) = delete;
    MappedFile &operator=(const MappedFile &) = delete;
    const uint8_t *data() const { return data_; }
    uint64_t size() const { return size_; }
    const std::string &path() const { return path_; }

private:
    std::string path_;
    const uint8_t *data_ = nullptr;
    uint64_t size_ = 0;
};

class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string &path);  // maps and validates
    const std::string &path() const { return file_.path(); }
    const std::vector<TensorInfo> &tensors() const { return header_.tensors; }
    const std::map<std::string, std::string> &metadata() const { return header_.metadata; }
    const TensorInfo *find(const std::string &name) const;  // nullptr when absent
    const uint8_t *data(const TensorInfo &t) const { return file_.data() + header_.data_start + t.begin; }

private:
    MappedFile file_;
    SafetensorsHeader header_;
    std::map<std::string, size_t> index_;
};

}  // namespace dbrx
