// A key/value object store inside one mmap'ed byte region shared by many
// processes: a file under /dev/shm, a file on a DAX filesystem, or a devdax
// device (/dev/daxX.Y) for CXL memory.
//
// Everything lives in the region: a header (magic, layout version, geometry,
// a robust process-shared mutex, persisted counters), an open-addressing hash
// index over a fixed table of entries that hold the FULL key bytes, a bitmap
// allocator over the data area, and CLOCK eviction. No Python or torch
// dependency, so it also builds into the CMake C++ tests under sanitizers.
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
#pragma once

#include <pthread.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace stratacache {

// Every failure to open, validate or use a region, with a message that names
// the region path and what is wrong.
class RegionError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RegionOptions {
  std::string path;
  uint64_t capacity = 0;          // bytes of the data area
  uint32_t max_objects = 65536;   // entries in the index
  uint32_t max_key_bytes = 512;   // longest key stored (keys are stored in full)
  uint32_t block_bytes = 4096;    // allocation unit; payloads are aligned to it
  int numa_node = -1;             // mbind the mapping to this node (-1: no binding)
  uint32_t file_mode = 0600;      // mode of a region file we create
  bool reset = false;             // drop every object at attach
  bool read_only = false;         // inspection: no lock, no writes, no counters
};

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
  static constexpr uint32_t kLayoutVersion = 2;  // 2: geometry checksum
  static constexpr uint32_t kAuxMax = 256;
  static constexpr uint32_t kLeasesPerEntry = 8;

  explicit SharedRegion(const RegionOptions& opts);
  ~SharedRegion();
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;

  // Writer protocol: reserve (evicting as needed), copy the payload to
  // data() + offset with no lock held, then commit (publish, replacing any
  // older version) or abort. reserve returns nullopt when there is no room
  // (object larger than the region, or everything left is pinned/being written).
  // With evict=false nothing is evicted (the caller hands victims to a lower
  // tier first, see pick_victim).
  std::optional<Reservation> reserve(std::string_view key, uint64_t size, std::string_view aux,
                                     bool evict = true);
  bool commit(const Reservation& r);
  void abort(const Reservation& r);
  // reserve + memcpy + commit in one call.
  bool put(std::string_view key, const void* data, uint64_t size, std::string_view aux);

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
  // advances the CLOCK hand like eviction but leases the chosen object and
  // returns (key, handle) instead of freeing it; the caller copies it out,
  // then erase_version(..., evicted=true) and release. nullopt: nothing is
  // evictable.
  std::optional<std::pair<std::string, ReadHandle>> pick_victim(double lease_s);
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

  uint8_t* data() const { return data_; }
  uint64_t data_bytes() const;
  const std::string& path() const { return opts_.path; }
  bool read_only() const { return opts_.read_only; }
  void* mapping() const { return base_; }
  size_t mapping_bytes() const { return map_bytes_; }

  // Test hook: take the region lock and never release it, so a test can kill
  // the process while it holds the lock and check that others recover.
  void lock_and_leak_for_testing();

 private:
  struct Header;
  struct Entry;
  struct Lease;
  struct Layout;

  void open_file();
  void map_region(uint64_t bytes);
  void attach();
  void init_header(const Layout& l);
  bool read_header(Header* h) const;
  uint64_t file_bytes() const;
  void ensure_backed(uint64_t total, bool alone);
  static uint64_t geometry_checksum(const Header& h);
  std::string header_problem(const Header& h, uint64_t file_bytes) const;
  std::string region_problem(const Header& h, uint64_t file_bytes, const Layout& l) const;
  void bind_numa();

  void lock();
  void unlock();
  bool derived_state_sane_locked() const;
  void repair_locked(bool sole);
  void rebuild_locked(bool sole);

  Entry* entry(uint32_t i) const;
  std::string_view entry_key(const Entry* e) const;
  uint64_t* buckets() const;
  uint64_t* bitmap() const;
  uint32_t* free_stack() const;

  int64_t lookup_locked(std::string_view key, uint64_t hash, uint64_t* bucket_pos) const;
  void bucket_insert_locked(uint32_t slot, uint64_t hash);
  void rebuild_buckets_locked();
  bool pinned_locked(Entry* e, uint64_t now);
  bool add_lease_locked(Entry* e, uint64_t now, double lease_s);
  ReadHandle handle_locked(uint32_t slot) const;
  bool owner_alive(uint32_t pid, uint64_t start) const;
  void free_entry_locked(uint32_t slot);
  void retire_or_free_locked(uint32_t slot, uint64_t now);
  struct ClockStop {
    int64_t victim = -1;  // an evictable READY entry, or -1
    uint64_t unit = 0, units = 0;
    bool freed = false;  // the hand freed this range of unusable space instead
  };
  ClockStop clock_step_locked(uint64_t now);
  bool evict_one_locked(uint64_t need_units, uint64_t* run_start);

  uint64_t find_free_run(uint64_t need) const;
  uint64_t run_around(uint64_t start, uint64_t len, uint64_t need) const;
  void set_bits(uint64_t start, uint64_t len, bool value);
  bool any_bit(uint64_t start, uint64_t len, bool value) const;

  RegionOptions opts_;
  int fd_ = -1;
  bool is_device_ = false;
  void* base_ = nullptr;
  size_t map_bytes_ = 0;
  Header* hdr_ = nullptr;
  uint8_t* data_ = nullptr;
};

// 64-bit hash of a key (index placement only; keys are always compared in full).
uint64_t hash_key(std::string_view key);

}  // namespace stratacache
