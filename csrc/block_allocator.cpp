// Bitmap allocator of the shared region's data area (see block_allocator.h).
#include "block_allocator.h"

#include <cstring>

namespace stratacache {

void BlockAllocator::set(uint64_t start, uint64_t len, bool value) {
  uint64_t i = start, end = start + len;
  while (i < end) {
    if ((i & 63) == 0 && i + 64 <= end) {
      bm_[i >> 6] = value ? ~0ull : 0;
      i += 64;
      continue;
    }
    if (value) bm_[i >> 6] |= 1ull << (i & 63);
    else bm_[i >> 6] &= ~(1ull << (i & 63));
    ++i;
  }
}

bool BlockAllocator::any(uint64_t start, uint64_t len, bool value) const {
  for (uint64_t i = start, end = start + len; i < end;) {
    if ((i & 63) == 0 && i + 64 <= end) {
      uint64_t w = bm_[i >> 6];
      if (value ? w != 0 : w != ~0ull) return true;
      i += 64;
      continue;
    }
    if (bool((bm_[i >> 6] >> (i & 63)) & 1) == value) return true;
    ++i;
  }
  return false;
}

uint64_t BlockAllocator::find_free_run(uint64_t need) const {
  auto scan = [&](uint64_t from, uint64_t to) -> uint64_t {
    uint64_t run_start = from, run_len = 0;
    for (uint64_t i = from; i < to;) {
      if ((i & 63) == 0 && i + 64 <= to) {
        uint64_t w = bm_[i >> 6];
        if (w == ~0ull) {
          run_len = 0;
          i += 64;
          continue;
        }
        if (w == 0) {
          if (run_len == 0) run_start = i;
          run_len += 64;
          i += 64;
          if (run_len >= need) return run_start;
          continue;
        }
      }
      if ((bm_[i >> 6] >> (i & 63)) & 1) {
        run_len = 0;
      } else {
        if (run_len == 0) run_start = i;
        if (++run_len >= need) return run_start;
      }
      ++i;
    }
    return kNone;
  };
  if (need == 0) return 0;
  uint64_t cursor = *cursor_ < units_ ? *cursor_ : 0;
  uint64_t r = scan(cursor, units_);
  if (r == kNone && cursor > 0) r = scan(0, std::min(units_, cursor + need));
  return r;
}

void BlockAllocator::take(uint64_t start, uint64_t len) {
  set(start, len, true);
  *cursor_ = start + len;
}

uint64_t BlockAllocator::run_around(uint64_t start, uint64_t len, uint64_t need) const {
  auto is_set = [&](uint64_t i) { return (bm_[i >> 6] >> (i & 63)) & 1; };
  uint64_t l = start, r = start + len;
  while (l > 0 && r - l < need && !is_set(l - 1)) --l;
  while (r < units_ && r - l < need && !is_set(r)) ++r;
  return r - l >= need ? l : kNone;
}

void BlockAllocator::clear() { memset(bm_, 0, word_count() * 8); }

}  // namespace stratacache
