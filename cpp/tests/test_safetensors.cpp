// The strict safetensors reader: one crafted file per rule, each rejected with the documented
// "<file>: <tensor or header>: <rule>" message, plus the shapes the format must accept.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "io/safetensors.h"
#include "test_safetensors_writer.h"

namespace dbrx {
namespace {

using iotest::expect_error;
using iotest::make_safetensors;
using iotest::raw_safetensors;
using iotest::TempDir;
using iotest::TestTensor;

class SafetensorsReject : public ::testing::Test {
protected:
    // Writes `bytes` to a file and expects opening it to fail with BAD_CHECKPOINT and `needle`.
    void expect_bad(const std::string &bytes, const std::string &needle) {
        const std::string path = dir_.file("bad.safetensors");
        iotest::write_file(path, bytes);
        expect_error([&] { SafetensorsFile f(path); }, DBRX_ERR_BAD_CHECKPOINT, needle);
    }
    // A header with one U8 tensor "t" of `n` bytes whose entry is `entry`, data of `n` bytes.
    void expect_bad_entry(const std::string &entry, const std::string &needle, size_t n = 4) {
        expect_bad(raw_safetensors("{\"t\":" + entry + "}", std::string(n, '\0')), needle);
    }
    TempDir dir_;
};

TEST_F(SafetensorsReject, ShorterThanLengthPrefix) { expect_bad("abcde", "header: file is 5 bytes, shorter than the 8-byte"); }

TEST_F(SafetensorsReject, EmptyFile) { expect_bad("", "file is 0 bytes"); }

TEST_F(SafetensorsReject, HeaderLengthOverLimit) {
    std::string bytes = raw_safetensors("{}");
    uint64_t n = 100'000'001;
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    expect_bad(bytes, "header length 100000001 exceeds the limit");
}

TEST_F(SafetensorsReject, HeaderLengthNearU64MaxDoesNotWrap) {
    std::string bytes = raw_safetensors("{}");
    for (int i = 0; i < 8; ++i) bytes[i] = '\xff';
    expect_bad(bytes, "exceeds the limit");
}

TEST_F(SafetensorsReject, HeaderLengthPastEndOfFile) {
    std::string bytes = raw_safetensors("{}");
    bytes[0] = 50;
    expect_bad(bytes, "header length 50 runs past the end of the file (10 bytes)");
}

TEST_F(SafetensorsReject, HeaderNotUtf8) { expect_bad(raw_safetensors("{\"a\xff\":1}"), "header: not valid UTF-8"); }

TEST_F(SafetensorsReject, OverlongUtf8) { expect_bad(raw_safetensors("{\"\xc0\xaf\":1}"), "not valid UTF-8"); }

TEST_F(SafetensorsReject, HeaderNotStartingWithBrace) {
    expect_bad(raw_safetensors(" {}"), "header: header does not start with '{'");
    expect_bad(raw_safetensors("[{}]"), "does not start with '{'");
    expect_bad(raw_safetensors(""), "does not start with '{'");
}

TEST_F(SafetensorsReject, HeaderInvalidJson) {
    expect_bad(raw_safetensors("{\"t\":"), "header: not valid JSON");
    expect_bad(raw_safetensors("{} {}"), "not valid JSON");
    expect_bad(raw_safetensors(std::string("{}\0", 3)), "not valid JSON");
}

TEST_F(SafetensorsReject, DuplicateTensorName) {
    expect_bad(raw_safetensors(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                               R"("t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
                               "x"),
               "duplicate key \"t\"");
}

TEST_F(SafetensorsReject, DuplicateKeyInsideEntry) {
    expect_bad_entry(R"({"dtype":"U8","dtype":"F32","shape":[4],"data_offsets":[0,4]})", "duplicate key \"dtype\"");
}

TEST_F(SafetensorsReject, DuplicateKeyInsideMetadata) {
    expect_bad(raw_safetensors(R"({"__metadata__":{"format":"pt","format":"np"}})"), "duplicate key \"format\"");
}

TEST_F(SafetensorsReject, MetadataNotAnObject) {
    expect_bad(raw_safetensors(R"({"__metadata__":["pt"]})"), "__metadata__: must be an object of string to string");
}

TEST_F(SafetensorsReject, MetadataValueNotString) {
    expect_bad(raw_safetensors(R"({"__metadata__":{"format":1}})"), "__metadata__: value of \"format\" is number");
}

TEST_F(SafetensorsReject, EmptyTensorName) {
    expect_bad(raw_safetensors(R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "x"),
               "header: a tensor has an empty name");
}

TEST_F(SafetensorsReject, EntryNotAnObject) { expect_bad_entry("[1,2]", "t: entry must be an object"); }

TEST_F(SafetensorsReject, MissingFields) {
    expect_bad_entry(R"({"shape":[4],"data_offsets":[0,4]})", "t: missing \"dtype\"");
    expect_bad_entry(R"({"dtype":"U8","data_offsets":[0,4]})", "t: missing \"shape\"");
    expect_bad_entry(R"({"dtype":"U8","shape":[4]})", "t: missing \"data_offsets\"");
}

TEST_F(SafetensorsReject, ExtraField) {
    expect_bad_entry(R"({"dtype":"U8","shape":[4],"data_offsets":[0,4],"stride":[1]})", "t: unexpected key \"stride\"");
}

TEST_F(SafetensorsReject, UnknownDtype) {
    expect_bad_entry(R"({"dtype":"F128","shape":[4],"data_offsets":[0,4]})", "t: unknown dtype \"F128\"");
    expect_bad_entry(R"({"dtype":"bf16","shape":[2],"data_offsets":[0,4]})", "unknown dtype \"bf16\"");
    expect_bad_entry(R"({"dtype":2,"shape":[4],"data_offsets":[0,4]})", "t: dtype must be a string");
}

TEST_F(SafetensorsReject, BadShape) {
    expect_bad_entry(R"({"dtype":"U8","shape":4,"data_offsets":[0,4]})", "t: shape must be an array");
    expect_bad_entry(R"({"dtype":"U8","shape":[-4],"data_offsets":[0,4]})", "t: shape must hold non-negative integers");
    expect_bad_entry(R"({"dtype":"U8","shape":[4.0],"data_offsets":[0,4]})", "shape must hold non-negative integers");
    expect_bad_entry(R"({"dtype":"U8","shape":["4"],"data_offsets":[0,4]})", "shape must hold non-negative integers");
    expect_bad_entry(R"({"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]})", "is too large", 0);
}

TEST_F(SafetensorsReject, BadDataOffsets) {
    expect_bad_entry(R"({"dtype":"U8","shape":[4],"data_offsets":[0]})", "t: data_offsets must be an array [begin, end]");
    expect_bad_entry(R"({"dtype":"U8","shape":[4],"data_offsets":[0,4,8]})", "data_offsets must be an array");
    expect_bad_entry(R"({"dtype":"U8","shape":[4],"data_offsets":{"begin":0}})", "data_offsets must be an array");
    expect_bad_entry(R"({"dtype":"U8","shape":[4],"data_offsets":[-1,3]})", "data_offsets must hold non-negative integers");
    expect_bad_entry(R"({"dtype":"U8","shape":[0],"data_offsets":[4,0]})", "t: data_offsets end 0 is before begin 4");
}

TEST_F(SafetensorsReject, SizeDisagreesWithShape) {
    expect_bad_entry(R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})",
                     "t: data_offsets span 4 bytes but shape and dtype need 8");
}

TEST_F(SafetensorsReject, ShapeProductOverflows) {
    expect_bad_entry(R"({"dtype":"BF16","shape":[4294967296,4294967296],"data_offsets":[0,4]})",
                     "t: shape times dtype size overflows 64 bits");
    // The dtype size alone pushes it over: 2^62 elements of 4 bytes.
    expect_bad_entry(R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]})", "overflows 64 bits");
}

TEST_F(SafetensorsReject, GapBetweenTensors) {
    expect_bad(raw_safetensors(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                               R"("b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})",
                               "12345"),
               "b: gap in the data section: begins at 3 but the previous tensor ends at 2");
    expect_bad(raw_safetensors(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})", "123"), "a: gap in the data section");
}

TEST_F(SafetensorsReject, OverlappingTensors) {
    expect_bad(raw_safetensors(R"({"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},)"
                               R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
                               "1234"),
               "b: overlaps the previous tensor");
    expect_bad(raw_safetensors(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                               R"("b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                               "12"),
               "overlaps the previous tensor");
}

TEST_F(SafetensorsReject, TrailingBytesAfterLastTensor) {
    expect_bad(raw_safetensors(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "123"),
               "header: 1 trailing bytes after the last tensor");
    expect_bad(raw_safetensors("{}", "x"), "1 trailing bytes");
}

TEST_F(SafetensorsReject, DataPastEndOfFile) {
    expect_bad(raw_safetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "12"),
               "a: data runs past the end of the file: ends at 4 of 2 data bytes");
    expect_bad(raw_safetensors(R"({"a":{"dtype":"U8","shape":[9223372036854775807],)"
                               R"("data_offsets":[0,9223372036854775807]}})"),
               "data runs past the end of the file");
}

TEST_F(SafetensorsReject, MessageStartsWithFileName) {
    const std::string path = dir_.file("named.safetensors");
    iotest::write_file(path, "abc");
    expect_error([&] { SafetensorsFile f(path); }, DBRX_ERR_BAD_CHECKPOINT, path + ": header: ");
}

TEST(SafetensorsFileIo, MissingFileIsIoError) {
    TempDir dir;
    expect_error([&] { SafetensorsFile f(dir.file("absent.safetensors")); }, DBRX_ERR_IO, "cannot open");
}

TEST(SafetensorsFileIo, DirectoryIsIoError) {
    TempDir dir;
    expect_error([&] { MappedFile f(dir.str()); }, DBRX_ERR_IO, "not a regular file");
}

TEST(SafetensorsAccept, TensorsMetadataAndSorting) {
    TempDir dir;
    // Written in offset order z, a, m; the JSON header lists them by name.
    const std::string path = dir.file("ok.safetensors");
    iotest::write_file(path, make_safetensors({{"z", {2, 3}, "BF16", 0x11}, {"a", {}, "F32", 0x22}, {"m", {0, 5}, "I64"}},
                                               {{"format", "pt"}}));
    SafetensorsFile f(path);
    ASSERT_EQ(f.tensors().size(), 3u);
    EXPECT_EQ(f.tensors()[0].name, "z");  // sorted by data offset, not by name
    EXPECT_EQ(f.tensors()[1].name, "a");
    EXPECT_EQ(f.metadata().at("format"), "pt");

    const TensorInfo *z = f.find("z");
    ASSERT_NE(z, nullptr);
    EXPECT_EQ(z->dtype, DType::BF16);
    EXPECT_EQ(z->numel(), 6);
    EXPECT_EQ(z->end - z->begin, 12u);
    EXPECT_EQ(f.data(*z)[11], 0x11);

    const TensorInfo *a = f.find("a");  // scalar: shape [], one element
    ASSERT_NE(a, nullptr);
    EXPECT_TRUE(a->shape.empty());
    EXPECT_EQ(a->numel(), 1);
    EXPECT_EQ(f.data(*a)[0], 0x22);

    const TensorInfo *m = f.find("m");  // zero-size dimension: no bytes
    ASSERT_NE(m, nullptr);
    EXPECT_EQ(m->numel(), 0);
    EXPECT_EQ(m->begin, m->end);
    EXPECT_EQ(f.find("absent"), nullptr);
}

TEST(SafetensorsAccept, EmptyHeaderAndTrailingSpaces) {
    const std::string bytes = raw_safetensors("{}      ");
    SafetensorsHeader h = parse_safetensors(reinterpret_cast<const uint8_t *>(bytes.data()), bytes.size(), "mem");
    EXPECT_TRUE(h.tensors.empty());
    EXPECT_EQ(h.data_start, 16u);
}

TEST(SafetensorsAccept, DTypeTable) {
    EXPECT_STREQ(dtype_name(DType::BF16), "BF16");
    EXPECT_EQ(dtype_size(DType::BF16), 2u);
    EXPECT_EQ(dtype_size(DType::F8_E4M3), 1u);
    EXPECT_EQ(dtype_size(DType::U64), 8u);
    EXPECT_STREQ(dtype_name(DType::F8_E5M2), "F8_E5M2");
}

// Offsets past 2^32 (a DBRX expert tensor is ~2 GiB, shards ~4.3 GB) must survive every step.
// A sparse file keeps the test cheap: the 5 GiB of data are never written.
TEST(SafetensorsAccept, TensorsBeyond4GiB) {
    TempDir dir;
    const uint64_t big = uint64_t{5} << 30;  // elements of a U8 tensor, > 4 GiB
    nlohmann::json header = {
        {"small", {{"dtype", "BF16"}, {"shape", {2}}, {"data_offsets", {big, big + 4}}}},
        {"huge", {{"dtype", "U8"}, {"shape", {big}}, {"data_offsets", {0, big}}}},
    };
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    const std::string path = dir.file("big.safetensors");
    iotest::write_file(path, raw_safetensors(text, "\x01\x02\x03\x04"));
    // Move the 4 data bytes to the end of a sparse 5 GiB hole.
    {
        const uint64_t data_start = 8 + text.size();
        int fd = ::open(path.c_str(), O_RDWR);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(data_start + big + 4)), 0);
        const char tail[4] = {1, 2, 3, 4};
        ASSERT_EQ(::pwrite(fd, tail, 4, static_cast<off_t>(data_start + big)), 4);
        ::close(fd);
    }
    SafetensorsFile f(path);
    const TensorInfo *huge = f.find("huge");
    const TensorInfo *small = f.find("small");
    ASSERT_NE(huge, nullptr);
    ASSERT_NE(small, nullptr);
    EXPECT_EQ(huge->numel(), static_cast<int64_t>(big));
    EXPECT_EQ(small->begin, big);
    EXPECT_EQ(f.data(*small) - f.data(*huge), static_cast<std::ptrdiff_t>(big));
    EXPECT_EQ(f.data(*small)[3], 4);
}

}  // namespace
}  // namespace dbrx
