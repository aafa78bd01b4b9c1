// An entry table in ordinary memory, for tests of the pieces that work on
// RegionEntry records (index, leases, CLOCK) without a mapped region.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "region_format.h"

struct TestEntries {
  static constexpr uint32_t kMaxKey = 64;
  explicit TestEntries(uint32_t n)
      : stride(stratacache::round_up(sizeof(stratacache::RegionEntry) + kMaxKey, 64)),
        words(stride * n / 8 + 8, 0),
        table(reinterpret_cast<uint8_t*>(words.data()), stride, n, kMaxKey) {}

  stratacache::RegionEntry* at(uint32_t i) const { return table.at(i); }
  // Makes slot i a READY object with this key (and hash, which a test may force).
  void make_ready(uint32_t i, const std::string& key, uint64_t hash, int32_t priority = 0) {
    stratacache::RegionEntry* e = at(i);
    std::memset(static_cast<void*>(e), 0, stride);
    e->state = stratacache::kReady;
    e->key_len = uint32_t(key.size());
    std::memcpy(e + 1, key.data(), key.size());
    e->hash = hash;
    e->priority = priority;
  }

  uint64_t stride;
  std::vector<uint64_t> words;  // 8-byte aligned backing store
  stratacache::EntryTable table;
};
