// CLOCK eviction over the shared region's entry table, priority-aware.
//
// The hand (stored in the region header) sweeps the entries. A READY entry
// that is referenced gets a second chance (its bit is cleared); one held by a
// live reader's lease is skipped; one whose priority is higher than the
// incoming object's is never chosen (a priority-0 put cannot evict a
// priority-10 object, the same rule as the Python tiers' residency). Space
// nobody can use any more (a dead writer's reservation, a retired version no
// reader holds) is reported on the way so the caller frees it. The evictor
// only chooses; SharedRegion frees.
#pragma once

#include <cstdint>

#include "region_format.h"

namespace stratacache {

class ClockEvictor {
 public:
  enum class Found { kNothing, kVictim, kUnusable };
  struct Stop {
    Found found = Found::kNothing;
    uint32_t slot = 0;
    bool dead_writer = false;  // kUnusable: a WRITING entry whose writer died
  };

  ClockEvictor() = default;
  ClockEvictor(EntryTable entries, uint64_t* hand) : entries_(entries), hand_(hand) {}

  // Advances the hand (at most two sweeps) to the next victim for an object
  // of priority incoming_priority, or to unusable space, or reports nothing.
  Stop step(uint64_t now, int32_t incoming_priority);

  // Whether a READY object of this priority may make room for the incoming one.
  static bool eligible(int32_t victim_priority, int32_t incoming_priority) {
    return victim_priority <= incoming_priority;
  }

 private:
  EntryTable entries_;
  uint64_t* hand_ = nullptr;
};

}  // namespace stratacache
