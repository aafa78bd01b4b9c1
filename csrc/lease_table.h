// Reader leases and writer ownership of shared-region entries.
//
// Each entry holds kLeasesPerEntry lease records (pid, process start time,
// count, expiry). A lease keeps an object's space from being reused while a
// reader copies it; a lease of a dead process (pid gone, a zombie, or the pid
// recycled by a process with another start time) or an expired one protects
// nothing and is dropped when seen. A WRITING entry names its writer the same
// way, so the space of a writer that died before committing is reclaimed.
#pragma once

#include <cstdint>

#include "region_format.h"

namespace stratacache {

// CLOCK_BOOTTIME in nanoseconds: the clock lease expiries are measured on.
uint64_t now_ns();

class LeaseTable {
 public:
  // Start time (clock ticks since boot) of this process, cached per pid.
  static uint64_t self_start_time();
  // Whether process (pid, start) still runs; start 0 matches any start time.
  static bool process_alive(uint32_t pid, uint64_t start);
  // True if a live, unexpired reader holds the entry; drops dead and expired leases.
  static bool pinned(RegionEntry* e, uint64_t now);
  // Adds (or extends) this process's lease. False when every record belongs
  // to another live reader: the caller then reads without a lease and relies
  // on the generation re-check after its copy.
  static bool add(RegionEntry* e, uint64_t now, double lease_s);
  // Drops one lease of this process.
  static void release(RegionEntry* e);
  static void clear(RegionEntry* e);
  // Marks the entry as being written by this process.
  static void claim_for_writing(RegionEntry* e);
  // A WRITING entry whose writer is gone: nobody will ever commit it.
  static bool writer_dead(const RegionEntry* e) { return !process_alive(e->owner_pid, e->owner_start); }
};

}  // namespace stratacache
