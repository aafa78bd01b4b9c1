// A key/value object store inside one mmap'ed byte region shared by many
// processes: a file under /dev/shm, a file on a DAX filesystem, or a devdax
// device (/dev/daxX.Y) for CXL memory.
//
// Everything lives in the region (region_format.h): a header (magic, layout
// version, geometry, a robust process-shared mutex, persisted counters), a
// fixed table of entries that hold the FULL key bytes, and the data area.
// SharedRegion wires the pieces, each its own class with its own C++ tests:
//   RegionFile     (region_file.h)    file creation, header validation, attach
//   HashIndex      (hash_index.h)     open-addressing buckets over the entries
//   BlockAllocator (block_allocator.h) bitmap over the data area's units
//   LeaseTable     (lease_table.h)    reader leases, writer liveness
//   ClockEvictor   (clock_evictor.h)  priority-aware CLOCK
// No Python or torch dependency, so it also builds into the CMake C++ tests
// under sanitizers.
//
// Crash safety. The entries are the only source of truth: the bitmap, the
// hash buckets, the free-entry stack and the byte counters are derived and are
// rebuilt from the entries whenever a process died holding the lock
// (EOWNERDEAD) or when a process attaches alone (flock). Entry fields are
// written before the entry's state is published, so a death at any instant
// leaves either a FREE entry or a complete one. Writers copy payloads OUTSIDE
// the lock into space reserved by a WRITING entry; only commit() makes the
// object visible, so a reader can never see a half-written object. Readers
// take leases (pid + expiry) so space is not reused under a long copy; a dead
// or expired reader's lease is ignored. Every free/reuse bumps the entry's
// generation, which readers re-check after copying.
//
// Priorities. Each object records the priority of its namespace kind, given
// at reserve/put. Eviction to make room for an object of priority p only
// takes objects of priority <= p, so KV traffic (priority 0) never evicts a
// saved model's parameters (priority 10).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "block_allocator.h"
#include "clock_evictor.h"
#include "hash_index.h"
#include "region_file.h"
#include "region_format.h"

namespace stratacache {

// A reservation for an object being written (state WRITING, invisible).
struct Reservation {
  uint32_t slot = 0;
  uint64_t gen = 0;
  uint64_t offset = 0;  // byte offset of the payload in the data area
  uint64_t size = 0;
};

// A reader's handle on a committed object, held under a lease.
struct ReadHandle {
  uint32_t slot = 0;
  uint64_t gen = 0;
  uint64_t offset = 0;
  uint64_t size = 0;
  std::string aux;  // the caller's small metadata blob stored with the object
};

struct ObjectInfo {
  std::string key;
  uint64_t size = 0;
  std::string aux;
};

struct RegionStats {
  uint64_t capacity = 0, block_bytes = 0, max_objects = 0, max_key_bytes = 0;
  uint64_t items = 0, used_bytes = 0, reserved_bytes = 0, writing = 0, retired = 0;
  uint64_t hits = 0, misses = 0, puts = 0, put_failures = 0, evictions = 0, deletes = 0;
  uint64_t repairs = 0, reclaimed_writers = 0;
};

class SharedRegion {
 public:
  explicit SharedRegion(const RegionOptions& opts);
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;

  // Writer protocol: reserve (evicting as needed), copy the payload to
  // data() + offset with no lock held, then commit (publish, replacing any
  // older version) or abort. reserve returns nullopt when there is no room
  // (object larger than the region, or everything left is pinned, being
  // written, or of a higher priority than `priority`). With evict=false
  // nothing is evicted (the caller hands victims to a lower tier first, see
  // pick_victim).
  std::optional<Reservation> reserve(std::string_view key, uint64_t size, std::string_view aux,
                                     bool evict = true, int32_t priority = 0);
  bool commit(const Reservation& r);
  void abort(const Reservation& r);
  // reserve + memcpy + commit in one call.
  bool put(std::string_view key, const void* data, uint64_t size, std::string_view aux, int32_t priority = 0);

  // Reader protocol: acquire a lease on the current version (counted as a hit
  // or miss when count_stats), copy, then release. release() and is_current()
  // say whether the object stayed the same version while it was read.
  std::optional<ReadHandle> acquire(std::string_view key, double lease_s, bool count_stats = true);
  bool release(uint32_t slot, uint64_t gen);
  bool is_current(uint32_t slot, uint64_t gen) const;
  // acquire + memcpy into out (capacity out_cap) + release; nullopt on a miss,
  // an object larger than out_cap, or a version change during the copy.
  std::optional<ReadHandle> get(std::string_view key, void* out, uint64_t out_cap);

  bool contains(std::string_view key);
  // One lock for the whole batch; out[i] = 1 if keys[i] is present.
  void contains_many(const std::string_view* keys, size_t n, uint8_t* out);
  bool erase(std::string_view key);
  // Erases the object only if (slot, gen) is still its current version, so a
  // reader that found a bad copy never deletes a newer good one.
  bool erase_version(uint32_t slot, uint64_t gen, bool evicted = false);
  // For callers that must see what is evicted (to write it to a lower tier):
  // advances the CLOCK hand like eviction for an incoming object of
  // `priority`, but leases the chosen object and returns (key, handle)
  // instead of freeing it; the caller copies it out, then
  // erase_version(..., evicted=true) and release. nullopt: nothing of
  // priority <= `priority` is evictable.
  std::optional<std::pair<std::string, ReadHandle>> pick_victim(double lease_s, int32_t priority = 0);
  // The priority recorded with the current version of key, or nullopt on a miss.
  std::optional<int32_t> priority_of(std::string_view key);
  std::vector<std::string> keys();
  void clear();

  // Maps the pages of committed objects (oldest slots first) into this
  // process, up to max_bytes of payload, so that first reads of them take no
  // page faults; returns the payload bytes populated. Extents are collected
  // under the lock and populated without it (madvise(MADV_POPULATE_READ),
  // or one read per page where the kernel lacks it); an object freed
  // meanwhile only costs a wasted populate, never a wrong read.
  uint64_t prefault(uint64_t max_bytes);
  // Lock-free snapshot of committed objects; works on read-only attaches.
  std::vector<ObjectInfo> snapshot() const;
  RegionStats stats() const;
  // Frees entries of dead writers and retired objects no live reader holds.
  size_t reclaim();
  // Audits the derived structures against the entries under the lock;
  // returns one line per inconsistency (empty when consistent).
  std::vector<std::string> check();

  uint8_t* data() const { return file_.data(); }
  uint64_t data_bytes() const { return hdr_->capacity; }
  const std::string& path() const { return file_.path(); }
  bool read_only() const { return file_.options().read_only; }
  void* mapping() const { return file_.base(); }
  size_t mapping_bytes() const { return file_.map_bytes(); }

  // Test hook: take the region lock and never release it, so a test can kill
  // the process while it holds the lock and check that others recover.
  void lock_and_leak_for_testing();

 private:
  class Locked;

  void wire();
  void on_attached(RegionFile::Attached how);
  void lock();
  void unlock();
  bool derived_state_sane_locked() const;
  void repair_locked(bool sole);
  void rebuild_locked(bool sole);

  RegionEntry* entry(uint32_t i) const { return entries_.at(i); }
  uint32_t* free_stack() const;

  ReadHandle handle_locked(uint32_t slot) const;
  void free_entry_locked(uint32_t slot);
  void retire_or_free_locked(uint32_t slot, uint64_t now);
  // Frees one victim (or unusable space) for an object of `priority`; with
  // need_units, *run_start receives a free run of that many units around the
  // freed space, or kNone. False when nothing could be freed.
  bool evict_one_locked(uint64_t need_units, int32_t priority, uint64_t* run_start);

  RegionFile file_;
  RegionHeader* hdr_ = nullptr;
  EntryTable entries_;
  HashIndex index_;
  BlockAllocator blocks_;
  ClockEvictor clock_;
};

}  // namespace stratacache
