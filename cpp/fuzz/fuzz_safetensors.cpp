// libFuzzer: parse_safetensors on arbitrary bytes. Rejection (dbrx::Error) is fine; anything
// else (a sanitizer report, another exception, a broken invariant) is a bug.
#include <cstdint>
#include <cstdlib>

#include "io/safetensors.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dbrx::SafetensorsHeader h;
    try {
        h = dbrx::parse_safetensors(data, size, "fuzz");
    } catch (const dbrx::Error &e) {
        if (e.status() != DBRX_ERR_BAD_CHECKPOINT) std::abort();
        return 0;
    }
    // Accepted: the tensors must tile the data section exactly, and touching them must be safe.
    if (h.data_start < 8 || h.data_start > size) std::abort();
    uint64_t expected = 0;
    volatile uint8_t sink = 0;
    for (const auto &t : h.tensors) {
        if (t.name.empty() || t.begin != expected || t.end < t.begin) std::abort();
        if (t.end - t.begin != static_cast<uint64_t>(t.numel()) * dbrx::dtype_size(t.dtype)) std::abort();
        if (t.end > t.begin) sink = sink ^ data[h.data_start + t.begin] ^ data[h.data_start + t.end - 1];
        expected = t.end;
    }
    if (h.data_start + expected != size) std::abort();
    (void)sink;
    return 0;
}
