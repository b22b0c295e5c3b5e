#include "kv/block_allocator.h"

#include <algorithm>
#include <string>

#include "util/error.h"
#include "util/hash.h"

namespace dbrx {

uint64_t prefix_block_key(uint64_t parent_key, std::span<const int32_t> tokens) {
    uint64_t h = splitmix64(parent_key);
    for (int32_t t : tokens) h = splitmix64(h ^ static_cast<uint32_t>(t));
    return splitmix64(h ^ tokens.size());
}

BlockAllocator::BlockAllocator(int32_t n_blocks, int32_t block_size, bool enable_prefix_cache)
    : block_size_(block_size), prefix_cache_(enable_prefix_cache) {
    if (n_blocks < 1) invalid_argument("KV pool: n_blocks must be >= 1, got " + std::to_string(n_blocks));
    if (block_size < 1) invalid_argument("KV pool: block_size must be >= 1, got " + std::to_string(block_size));
    blocks_.resize(static_cast<size_t>(n_blocks));
    free_.reserve(blocks_.size());
    // Stack order: block 0 is handed out first.
    for (int32_t b = n_blocks - 1; b >= 0; --b) free_.push_back(b);
}

std::optional<int32_t> BlockAllocator::allocate() {
    int32_t b;
    if (!free_.empty()) {
        b = free_.back();
        free_.pop_back();
    } else if (!lru_.empty()) {
        b = lru_.front();
        lru_.pop_front();
        forget_prefix(b);
    } else {
        return std::nullopt;
    }
    blocks_[b].refs = 1;
    return b;
}

void BlockAllocator::add_ref(int32_t block) {
    Block &blk = blocks_.at(block);
    if (blk.refs == 0) fail(DBRX_ERR_INTERNAL, "KV pool: add_ref on unreferenced block " + std::to_string(block));
    ++blk.refs;
}

void BlockAllocator::release(int32_t block) {
    Block &blk = blocks_.at(block);
    if (blk.refs <= 0) fail(DBRX_ERR_INTERNAL, "KV pool: double release of block " + std::to_string(block));
    if (--blk.refs > 0) return;
    if (blk.registered) {
        blk.lru = lru_.insert(lru_.end(), block);
    } else {
        free_.push_back(block);
    }
}

std::optional<int32_t> BlockAllocator::lookup(uint64_t key, std::span<const int32_t> tokens) {
    if (!prefix_cache_) return std::nullopt;
    auto it = by_key_.find(key);
    if (it == by_key_.end()) return std::nullopt;
    Block &blk = blocks_[it->second];
    if (!std::equal(blk.tokens.begin(), blk.tokens.end(), tokens.begin(), tokens.end())) return std::nullopt;
    if (blk.refs == 0) lru_.erase(blk.lru);
    ++blk.refs;
    return it->second;
}

void BlockAllocator::register_prefix(int32_t block, uint64_t key, std::span<const int32_t> tokens) {
    if (!prefix_cache_) return;
    Block &blk = blocks_.at(block);
    if (blk.refs == 0) fail(DBRX_ERR_INTERNAL, "KV pool: registering unreferenced block " + std::to_string(block));
    if (blk.registered || by_key_.count(key) != 0) return;
    blk.registered = true;
    blk.key = key;
    blk.tokens.assign(tokens.begin(), tokens.end());
    by_key_.emplace(key, block);
}

void BlockAllocator::forget_prefix(int32_t block) {
    Block &blk = blocks_[block];
    by_key_.erase(blk.key);
    blk.registered = false;
    blk.tokens.clear();
}

}  // namespace dbrx
