// Priority-aware CLOCK over the shared region's entries (see clock_evictor.h).
#include "clock_evictor.h"

#include "lease_table.h"

namespace stratacache {

ClockEvictor::Stop ClockEvictor::step(uint64_t now, int32_t incoming_priority) {
  const uint64_t n = entries_.size();
  for (uint64_t sweep = 0; sweep < 2 * n + 1; ++sweep) {
    uint32_t i = uint32_t(*hand_ % n);
    *hand_ = (i + 1) % n;
    RegionEntry* e = entries_.at(i);
    uint32_t st = e->state;
    if (st == kReady) {
      if (!eligible(e->priority, incoming_priority)) continue;  // keeps its reference bit
      if (LeaseTable::pinned(e, now)) continue;
      if (e->ref) {
        e->ref = 0;
        continue;
      }
      return Stop{Found::kVictim, i, false};
    }
    const bool dead_writer = st == kWriting && LeaseTable::writer_dead(e);
    if (dead_writer || (st == kRetired && !LeaseTable::pinned(e, now))) return Stop{Found::kUnusable, i, dead_writer};
  }
  return Stop{};
}

}  // namespace stratacache
