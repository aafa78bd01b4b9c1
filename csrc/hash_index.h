// The shared region's hash index: open-addressing buckets that map a key to
// its READY entry. A bucket holds (upper 32 bits of the hash, slot + 1); 0 is
// empty and kTomb a deleted bucket. Lookups always compare the full key bytes
// stored in the entry; the hash only picks where to look.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "region_format.h"

namespace stratacache {

// 64-bit hash of a key (index placement only; keys are always compared in full).
uint64_t hash_key(std::string_view key);

class HashIndex {
 public:
  static constexpr uint64_t kTomb = ~0ull;

  // buckets: bucket_count (a power of two) words; tombstones: the count kept
  // in the header, maintained here.
  HashIndex() = default;
  HashIndex(uint64_t* buckets, uint64_t bucket_count, uint64_t* tombstones, EntryTable entries)
      : b_(buckets), count_(bucket_count), tombstones_(tombstones), entries_(entries) {}

  // The READY slot holding key, or -1; *pos receives its bucket.
  int64_t find(std::string_view key, uint64_t hash, uint64_t* pos = nullptr) const;
  // Adds a READY slot not yet indexed. live_items (the READY entries, this
  // one included) decides when the table is rebuilt to drop tombstones.
  void insert(uint32_t slot, uint64_t hash, uint64_t live_items);
  // Points the bucket at pos (found by find) at another slot of the same key.
  void replace(uint64_t pos, uint32_t slot, uint64_t hash);
  void erase_at(uint64_t pos);
  // Drops the slot's bucket if it is indexed. True if it was.
  bool erase_slot(uint32_t slot);
  // Re-inserts every READY entry into empty buckets (drops tombstones).
  void rebuild();
  void clear();
  // One line per bucket that points at a slot that is not READY; counts
  // live buckets and tombstones for the caller's cross-checks.
  std::vector<std::string> audit(uint64_t* live, uint64_t* tombs) const;

 private:
  static uint64_t word(uint32_t slot, uint64_t hash) {
    return (uint64_t(uint32_t(hash >> 32)) << 32) | (uint64_t(slot) + 1);
  }

  uint64_t* b_ = nullptr;
  uint64_t count_ = 0;
  uint64_t* tombstones_ = nullptr;
  EntryTable entries_;
};

}  // namespace stratacache
