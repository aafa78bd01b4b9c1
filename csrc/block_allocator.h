// The shared region's data-area allocator: one bit per allocation unit
// (block_bytes each) in a bitmap stored in the region, next-fit from a cursor
// that is also stored there. Payloads are runs of whole units, so every
// payload is block-aligned.
#pragma once

#include <cstdint>

#include "region_format.h"

namespace stratacache {

class BlockAllocator {
 public:
  // bitmap: (units + 63) / 64 words; cursor: where the next search starts.
  BlockAllocator() = default;
  BlockAllocator(uint64_t* bitmap, uint64_t units, uint64_t* cursor)
      : bm_(bitmap), units_(units), cursor_(cursor) {}

  // First unit of a free run of `need` units at or after the cursor
  // (wrapping once), or kNone. need == 0 gives 0.
  uint64_t find_free_run(uint64_t need) const;
  // Marks [start, start + len) used and moves the cursor past it.
  void take(uint64_t start, uint64_t len);
  void give_back(uint64_t start, uint64_t len) { set(start, len, false); }
  // Grows the free range [start, start + len) (just freed) over free
  // neighbours until it holds `need` units: its first unit, or kNone.
  uint64_t run_around(uint64_t start, uint64_t len, uint64_t need) const;
  // Whether any unit of the range is used (value true) or free (false).
  bool any(uint64_t start, uint64_t len, bool value) const;
  void set(uint64_t start, uint64_t len, bool value);
  void clear();
  void reset_cursor() { *cursor_ = 0; }
  const uint64_t* words() const { return bm_; }
  uint64_t word_count() const { return (units_ + 63) / 64; }

 private:
  uint64_t* bm_ = nullptr;
  uint64_t units_ = 0;
  uint64_t* cursor_ = nullptr;
};

}  // namespace stratacache
