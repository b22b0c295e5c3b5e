// bfloat16 stored as its raw 16 bits (the checkpoint's on-disk format).
#pragma once

#include <cstdint>
#include <cstring>

namespace dbrx {

using bf16_t = uint16_t;

inline float bf16_to_float(bf16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// Round to nearest even, NaN kept quiet.
inline bf16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<bf16_t>(u >> 16);
}

}  // namespace dbrx
