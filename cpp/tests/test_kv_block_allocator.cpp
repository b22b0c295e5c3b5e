// Block bookkeeping of the paged KV cache: reference counts, the free list, prefix registration,
// lookups that verify tokens, and least-recently-used eviction of unreferenced cached blocks.
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "kv/block_allocator.h"
#include "util/error.h"

namespace dbrx {
namespace {

std::vector<int32_t> toks(int32_t base, int32_t n = 4) {
    std::vector<int32_t> t;
    for (int32_t i = 0; i < n; ++i) t.push_back(base + i);
    return t;
}

TEST(KvBlockAllocator, HandsOutEveryBlockOnceThenRunsOut) {
    BlockAllocator a(5, 4, true);
    std::set<int32_t> seen;
    for (int i = 0; i < 5; ++i) {
        auto b = a.allocate();
        ASSERT_TRUE(b);
        EXPECT_TRUE(seen.insert(*b).second);
        EXPECT_EQ(a.ref_count(*b), 1);
    }
    EXPECT_FALSE(a.allocate());
    EXPECT_EQ(a.n_used(), 5);
    EXPECT_EQ(a.available(), 0);
    a.release(2);
    EXPECT_EQ(a.n_free(), 1);
    EXPECT_EQ(a.allocate(), 2);
}

TEST(KvBlockAllocator, ReferenceCountsAndMisuse) {
    BlockAllocator a(2, 4, true);
    int32_t b = *a.allocate();
    a.add_ref(b);
    EXPECT_EQ(a.ref_count(b), 2);
    a.release(b);
    EXPECT_EQ(a.n_used(), 1);
    a.release(b);
    EXPECT_EQ(a.n_used(), 0);
    EXPECT_THROW(a.release(b), Error);
    EXPECT_THROW(a.add_ref(b), Error);
    EXPECT_THROW(BlockAllocator(0, 4, true), Error);
    EXPECT_THROW(BlockAllocator(4, 0, true), Error);
}

TEST(KvBlockAllocator, RegisteredBlocksAreSharedThenCachedThenEvictedLru) {
    BlockAllocator a(3, 4, true);
    const uint64_t k1 = prefix_block_key(kPrefixRootKey, toks(0));
    const uint64_t k2 = prefix_block_key(k1, toks(4));
    int32_t b1 = *a.allocate();
    int32_t b2 = *a.allocate();
    a.register_prefix(b1, k1, toks(0));
    a.register_prefix(b2, k2, toks(4));
    // Shared while referenced.
    EXPECT_EQ(a.lookup(k1, toks(0)), b1);
    EXPECT_EQ(a.ref_count(b1), 2);
    a.release(b1);
    a.release(b1);
    a.release(b2);
    EXPECT_EQ(a.n_cached(), 2);
    EXPECT_EQ(a.n_free(), 1);
    EXPECT_EQ(a.n_used(), 0);
    // A hit takes the block out of the evictable set.
    EXPECT_EQ(a.lookup(k2, toks(4)), b2);
    EXPECT_EQ(a.n_cached(), 1);
    a.release(b2);  // now b1 is the least recently used
    int32_t fresh = *a.allocate();  // the free one first
    EXPECT_NE(fresh, b1);
    EXPECT_NE(fresh, b2);
    EXPECT_EQ(a.allocate(), b1);  // then evicts b1
    EXPECT_FALSE(a.lookup(k1, toks(0)));
    EXPECT_EQ(a.lookup(k2, toks(4)), b2);
}

TEST(KvBlockAllocator, KeysVerifyTokensAndFirstRegistrationWins) {
    BlockAllocator a(3, 4, true);
    const uint64_t k = prefix_block_key(kPrefixRootKey, toks(0));
    int32_t b = *a.allocate();
    a.register_prefix(b, k, toks(0));
    EXPECT_FALSE(a.lookup(k, toks(1)));  // same key, other tokens: a miss, not a wrong hit
    int32_t dup = *a.allocate();
    a.register_prefix(dup, k, toks(0));
    EXPECT_EQ(a.lookup(k, toks(0)), b);
    a.release(b);
    a.release(b);
    a.release(dup);
    EXPECT_EQ(a.n_cached(), 1);  // the duplicate went back to the free list
    EXPECT_EQ(a.n_free(), 2);
    // Keys chain: the same tokens under another parent are another key.
    EXPECT_NE(prefix_block_key(k, toks(4)), prefix_block_key(kPrefixRootKey, toks(4)));
}

TEST(KvBlockAllocator, DisabledPrefixCacheNeverCaches) {
    BlockAllocator a(2, 4, false);
    const uint64_t k = prefix_block_key(kPrefixRootKey, toks(0));
    int32_t b = *a.allocate();
    a.register_prefix(b, k, toks(0));
    a.release(b);
    EXPECT_EQ(a.n_cached(), 0);
    EXPECT_FALSE(a.lookup(k, toks(0)));
}

}  // namespace
}  // namespace dbrx
