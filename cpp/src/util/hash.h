// Integer mixing shared by the sampler's counter-based random numbers and the prefix cache's block keys.
#pragma once

#include <cstdint>

namespace dbrx {

// splitmix64 finaliser: cheap, and every input bit reaches every output bit.
constexpr uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

}  // namespace dbrx
