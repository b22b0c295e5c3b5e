// The paged KV cache's bookkeeping: which blocks of the backend's pool are free, which are
// referenced (and by how many sequences), and which hold a reusable prompt prefix. The K/V data
// itself lives in the backend's KvPool; this class only hands out block ids.
//
// A full block of prompt tokens can be registered under its hash-chain key; when its last
// reference goes it stays "cached" (evictable, least recently used first) until a new allocation
// needs it, so a later prompt starting with the same tokens reuses it instead of recomputing.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace dbrx {

// Key of a full block: hash of (parent block's key, this block's token ids).
uint64_t prefix_block_key(uint64_t parent_key, std::span<const int32_t> tokens);
// Key of the first block's parent.
inline constexpr uint64_t kPrefixRootKey = 0x9e3779b97f4a7c15ULL;

class BlockAllocator {
public:
    BlockAllocator(int32_t n_blocks, int32_t block_size, bool enable_prefix_cache);

    int32_t n_blocks() const { return static_cast<int32_t>(blocks_.size()); }
    int32_t block_size() const { return block_size_; }
    bool prefix_cache_enabled() const { return prefix_cache_; }

    // Blocks that allocate() could hand out now (free + evictable cached).
    int32_t available() const { return n_free() + n_cached(); }
    int32_t n_used() const { return n_blocks() - available(); }
    int32_t n_free() const { return static_cast<int32_t>(free_.size()); }
    int32_t n_cached() const { return static_cast<int32_t>(lru_.size()); }

    // A block with reference count 1, or nullopt when none is free and no cached block can be evicted.
    std::optional<int32_t> allocate();
    void add_ref(int32_t block);
    // Drops one reference; at zero the block becomes cached (if registered) or free.
    void release(int32_t block);

    // The cached block holding exactly `tokens` under `key`, with one more reference; nullopt on a miss.
    std::optional<int32_t> lookup(uint64_t key, std::span<const int32_t> tokens);
    // Makes a full, referenced block findable under `key`. A key already held by another block
    // is left alone (the first copy wins; this block stays private and is freed normally).
    void register_prefix(int32_t block, uint64_t key, std::span<const int32_t> tokens);

    int32_t ref_count(int32_t block) const { return blocks_.at(block).refs; }

private:
    struct Block {
        int32_t refs = 0;
        bool registered = false;
        uint64_t key = 0;
        std::vector<int32_t> tokens;       // checked on lookup, so a hash collision is only a miss
        std::list<int32_t>::iterator lru;  // valid while registered && refs == 0
    };
    void forget_prefix(int32_t block);

    int32_t block_size_;
    bool prefix_cache_;
    std::vector<Block> blocks_;
    std::vector<int32_t> free_;  // unregistered, unreferenced blocks (stack)
    std::list<int32_t> lru_;     // registered, unreferenced blocks; front = least recently used
    std::unordered_map<uint64_t, int32_t> by_key_;
};

}  // namespace dbrx
