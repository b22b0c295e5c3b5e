#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <string_view>

#include "io/strict_json.h"
#include "util/error.h"

namespace dbrx {

namespace {

// The reference implementation's limit; a larger header is a denial-of-service attempt.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeEntry {
    DType type;
    const char *name;
    size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {DType::BOOL, "BOOL", 1}, {DType::U8, "U8", 1},     {DType::I8, "I8", 1},     {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::I16, "I16", 2}, {DType::U16, "U16", 2}, {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4},   {DType::U32, "U32", 4},   {DType::F32, "F32", 4},
    {DType::F64, "F64", 8},   {DType::I64, "I64", 8},   {DType::U64, "U64", 8},
};

const DTypeEntry &dtype_entry(DType t) {
    for (const auto &e : kDTypes)
        if (e.type == t) return e;
    fail(DBRX_ERR_INTERNAL, "unknown DType value " + std::to_string(static_cast<int>(t)));
}

// Names come from the file; keep messages readable even for a hostile megabyte-long name.
std::string shown(const std::string &name) {
    constexpr size_t kMax = 200;
    return name.size() <= kMax ? name : name.substr(0, kMax) + "...";
}

class HeaderChecker {
public:
    explicit HeaderChecker(const std::string &label) : label_(label) {}

    [[noreturn]] void reject(const std::string &where, const std::string &rule) const {
        bad_checkpoint(label_ + ": " + where + ": " + rule);
    }

    void read_metadata(const nlohmann::json &value, SafetensorsHeader &out) const {
        if (!value.is_object()) reject("__metadata__", "must be an object of string to string");
        for (const auto &[key, v] : value.items()) {
            if (!v.is_string())
                reject("__metadata__", "value of \"" + shown(key) + "\" is " + v.type_name() + ", not a string");
            out.metadata.emplace(key, v.get<std::string>());
        }
    }

    uint64_t read_unsigned(const std::string &name, const char *field, const nlohmann::json &v) const {
        if (!v.is_number_unsigned())
            reject(name, std::string(field) + " must hold non-negative integers, found " + v.dump());
        return v.get<uint64_t>();
    }

    TensorInfo read_tensor(const std::string &name, const nlohmann::json &entry) const {
        if (name.empty()) reject("header", "a tensor has an empty name");
        if (!entry.is_object()) reject(shown(name), "entry must be an object, found " + std::string(entry.type_name()));
        for (const auto &[key, v] : entry.items())
            if (key != "dtype" && key != "shape" && key != "data_offsets")
                reject(shown(name), "unexpected key \"" + shown(key) + "\" (only dtype, shape, data_offsets)");
        for (const char *key : {"dtype", "shape", "data_offsets"})
            if (!entry.contains(key)) reject(shown(name), std::string("missing \"") + key + "\"");

        TensorInfo t;
        t.name = name;
        const auto &dtype = entry["dtype"];
        if (!dtype.is_string()) reject(shown(name), "dtype must be a string");
        const auto &dname = dtype.get_ref<const std::string &>();
        auto it = std::find_if(std::begin(kDTypes), std::end(kDTypes), [&](const DTypeEntry &e) { return dname == e.name; });
        if (it == std::end(kDTypes)) reject(shown(name), "unknown dtype \"" + shown(dname) + "\"");
        t.dtype = it->type;

        const auto &shape = entry["shape"];
        if (!shape.is_array()) reject(shown(name), "shape must be an array of non-negative integers");
        uint64_t nbytes = it->size;
        bool overflow = false;
        for (const auto &d : shape) {
            uint64_t dim = read_unsigned(shown(name), "shape", d);
            if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                reject(shown(name), "shape dimension " + std::to_string(dim) + " is too large");
            t.shape.push_back(static_cast<int64_t>(dim));
            overflow = overflow || __builtin_mul_overflow(nbytes, dim, &nbytes);
        }
        // A zero dimension makes the product 0 whatever overflowed before it.
        if (std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end()) {
            nbytes = 0;
            overflow = false;
        }
        if (overflow) reject(shown(name), "shape times dtype size overflows 64 bits");

        const auto &offsets = entry["data_offsets"];
        if (!offsets.is_array() || offsets.size() != 2)
            reject(shown(name), "data_offsets must be an array [begin, end]");
        t.begin = read_unsigned(shown(name), "data_offsets", offsets[0]);
        t.end = read_unsigned(shown(name), "data_offsets", offsets[1]);
        if (t.end < t.begin)
            reject(shown(name), "data_offsets end " + std::to_string(t.end) + " is before begin " + std::to_string(t.begin));
        if (t.end - t.begin != nbytes)
            reject(shown(name), "data_offsets span " + std::to_string(t.end - t.begin) + " bytes but shape and dtype need " +
                                    std::to_string(nbytes));
        return t;
    }

    // Sorted by offset the tensors must tile the data section exactly: no gap, no overlap, no tail.
    void check_layout(std::vector<TensorInfo> &tensors, uint64_t data_bytes) const {
        std::sort(tensors.begin(), tensors.end(), [](const TensorInfo &a, const TensorInfo &b) {
            return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
        });
        uint64_t expected = 0;
        for (const auto &t : tensors) {
            if (t.begin > expected)
                reject(shown(t.name), "gap in the data section: begins at " + std::to_string(t.begin) +
                                          " but the previous tensor ends at " + std::to_string(expected));
            if (t.begin < expected)
                reject(shown(t.name), "overlaps the previous tensor: begins at " + std::to_string(t.begin) +
                                          " before " + std::to_string(expected));
            expected = t.end;
        }
        if (expected > data_bytes)
            reject(tensors.empty() ? "header" : shown(tensors.back().name),
                   "data runs past the end of the file: ends at " + std::to_string(expected) + " of " +
                       std::to_string(data_bytes) + " data bytes");
        if (expected < data_bytes)
            reject("header", std::to_string(data_bytes - expected) + " trailing bytes after the last tensor");
    }

private:
    const std::string &label_;
};

}  // namespace

const char *dtype_name(DType t) { return dtype_entry(t).name; }
size_t dtype_size(DType t) { return dtype_entry(t).size; }

int64_t TensorInfo::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

SafetensorsHeader parse_safetensors(const uint8_t *buf, uint64_t size, const std::string &label) {
    HeaderChecker check(label);
    if (size < 8) check.reject("header", "file is " + std::to_string(size) + " bytes, shorter than the 8-byte length prefix");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | buf[i];
    if (n > kMaxHeaderBytes)
        check.reject("header", "header length " + std::to_string(n) + " exceeds the limit of " +
                                   std::to_string(kMaxHeaderBytes) + " bytes");
    if (n > size - 8)  // n <= 1e8, so no overflow; written this way to never form 8 + n past size
        check.reject("header", "header length " + std::to_string(n) + " runs past the end of the file (" +
                                   std::to_string(size) + " bytes)");
    std::string_view text(reinterpret_cast<const char *>(buf + 8), n);
    if (text.empty() || text.front() != '{') check.reject("header", "header does not start with '{'");

    nlohmann::json doc = parse_strict_json(text, label + ": header");
    if (!doc.is_object()) check.reject("header", "header is not a JSON object");

    SafetensorsHeader out;
    out.data_start = 8 + n;
    for (const auto &[key, value] : doc.items()) {
        if (key == "__metadata__")
            check.read_metadata(value, out);
        else
            out.tensors.push_back(check.read_tensor(key, value));
    }
    check.check_layout(out.tensors, size - out.data_start);
    return out;
}

MappedFile::MappedFile(const std::string &path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(DBRX_ERR_IO, path + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        int err = errno;
        ::close(fd);
        fail(DBRX_ERR_IO, path + ": cannot stat: " + std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(DBRX_ERR_IO, path + ": not a regular file");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ > 0) {  // mmap rejects length 0; an empty file maps to nothing
        void *p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        int err = errno;
        ::close(fd);
        if (p == MAP_FAILED) fail(DBRX_ERR_IO, path + ": cannot mmap " + std::to_string(size_) + " bytes: " + std::strerror(err));
        data_ = static_cast<const uint8_t *>(p);
    } else {
        ::close(fd);
    }
}

MappedFile::~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t *>(data_), size_);
}

SafetensorsFile::SafetensorsFile(const std::string &path) : file_(path) {
    header_ = parse_safetensors(file_.data(), file_.size(), path);
    for (size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
}

const TensorInfo *SafetensorsFile::find(const std::string &name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

}  // namespace dbrx
