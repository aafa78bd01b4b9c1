// The on-disk format of a shared region (see shared_region.h for the design):
// the header page, the entry records, their reader-lease records, the layout
// that places every area, and the atomic accessors every piece uses on them.
// Changing any struct here changes the format: bump kLayoutVersion.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string_view>

namespace stratacache {

// 3: an entry records the priority of its object (CLOCK skips higher ones).
// 2: geometry checksum.
constexpr uint32_t kLayoutVersion = 3;
constexpr char kRegionMagic[8] = {'S', 'C', 'R', 'E', 'G', 'I', 'O', 'N'};
constexpr uint64_t kHeaderBytes = 4096;
constexpr uint32_t kAuxMax = 256;        // bytes of caller metadata stored with an object
constexpr uint32_t kLeasesPerEntry = 8;  // reader-lease records per entry
constexpr uint64_t kNone = ~0ull;        // "no unit / no run" for the allocator
// Largest data area and allocation unit a region may have; they keep every
// offset the layout derives far from 2^64.
constexpr uint64_t kMaxCapacity = 1ull << 56;
constexpr uint32_t kMaxBlockBytes = 1u << 30;

enum EntryState : uint32_t { kFree = 0, kWriting = 1, kReady = 2, kRetired = 3 };

struct RegionHeader {
  char magic[8];  // written last: a region is initialised once it is set
  uint32_t layout_version;
  uint32_t header_bytes;
  uint64_t total_bytes;
  uint64_t capacity;  // data bytes = units * block_bytes
  uint64_t units;
  uint32_t max_objects, max_key_bytes, block_bytes, bucket_count;
  uint32_t entry_stride, aux_max, leases_per_entry, mutex_bytes;
  uint64_t buckets_off, entries_off, free_off, bitmap_off, data_off;
  uint64_t geometry_sum;  // geometry_checksum() of layout_version .. data_off
  alignas(64) pthread_mutex_t mutex;
  // Derived state, guarded by the mutex, rebuilt by repair.
  alignas(64) uint64_t used_bytes;
  uint64_t used_units;
  uint64_t items, writing, retired, tombstones;
  uint64_t global_gen, clock_hand, alloc_cursor;
  uint32_t free_top, pad0;
  // Counters persisted across restarts (atomic increments; read lock-free).
  alignas(64) uint64_t hits, misses, puts, put_failures, evictions, deletes, repairs,
      reclaimed_writers;
};
static_assert(sizeof(RegionHeader) <= kHeaderBytes, "the header must fit its page");

// One reader's hold on an entry: count leases of process (pid, start time)
// until expiry_ns (CLOCK_BOOTTIME).
struct LeaseRecord {
  uint32_t pid;
  uint32_t count;
  uint64_t start;
  uint64_t expiry_ns;
};

struct RegionEntry {
  uint32_t state;
  uint32_t key_len;
  uint64_t gen;  // changes whenever the entry is reserved or freed
  uint64_t hash;
  uint64_t unit;   // first allocation unit
  uint64_t units;  // allocation units held
  uint64_t size;   // payload bytes
  uint32_t aux_len;
  uint32_t ref;  // CLOCK reference bit
  uint32_t owner_pid;
  int32_t priority;  // of the object's namespace kind; eviction never takes a higher one
  uint64_t owner_start;
  LeaseRecord leases[kLeasesPerEntry];
  uint8_t aux[kAuxMax];
  // key bytes follow (max_key_bytes)
};

inline uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Where each area of a region with this geometry lies. The arguments must be
// in the ranges RegionFile enforces, so that nothing here overflows.
struct RegionLayout {
  uint64_t units, bucket_count, entry_stride;
  uint64_t buckets_off, entries_off, free_off, bitmap_off, data_off, total;

  RegionLayout(uint64_t capacity, uint64_t max_objects, uint64_t max_key_bytes, uint64_t block_bytes) {
    units = capacity / block_bytes;
    bucket_count = 8;
    while (bucket_count < 2ull * max_objects) bucket_count <<= 1;
    entry_stride = round_up(sizeof(RegionEntry) + max_key_bytes, 64);
    buckets_off = kHeaderBytes;
    entries_off = round_up(buckets_off + bucket_count * 8, 64);
    free_off = round_up(entries_off + entry_stride * max_objects, 64);
    bitmap_off = round_up(free_off + 4ull * max_objects, 64);
    data_off = round_up(bitmap_off + (units + 63) / 64 * 8, std::max<uint64_t>(block_bytes, 4096));
    total = data_off + units * block_bytes;
  }
};

// The entry table of a mapped region: fixed-stride records, key bytes after each.
class EntryTable {
 public:
  EntryTable() = default;
  EntryTable(uint8_t* first, uint64_t stride, uint32_t count, uint32_t max_key_bytes)
      : first_(first), stride_(stride), count_(count), max_key_bytes_(max_key_bytes) {}

  RegionEntry* at(uint32_t i) const { return reinterpret_cast<RegionEntry*>(first_ + uint64_t(i) * stride_); }
  uint32_t size() const { return count_; }
  // The stored key, clamped to max_key_bytes so a damaged key_len never reads past the record.
  std::string_view key(const RegionEntry* e) const {
    return {reinterpret_cast<const char*>(e + 1), std::min<uint32_t>(e->key_len, max_key_bytes_)};
  }

 private:
  uint8_t* first_ = nullptr;
  uint64_t stride_ = 0;
  uint32_t count_ = 0;
  uint32_t max_key_bytes_ = 0;
};

// Fields other processes read without the lock are accessed atomically.
template <class T>
T load_acquire(const T& v) {
  return std::atomic_ref<T>(const_cast<T&>(v)).load(std::memory_order_acquire);
}
template <class T>
void store_release(T& v, T x) {
  std::atomic_ref<T>(v).store(x, std::memory_order_release);
}
inline void bump(uint64_t& counter, uint64_t n = 1) {
  std::atomic_ref<uint64_t>(counter).fetch_add(n, std::memory_order_relaxed);
}

}  // namespace stratacache
