// SharedRegion: the writer and reader protocols, eviction, crash repair and
// the audit, wired from the region's parts (see shared_region.h).
#include "shared_region.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older headers lack the name
#endif

#include <cstring>
#include <stdexcept>

#include "lease_table.h"

namespace stratacache {

// ---------------------------------------------------------------- attach

SharedRegion::SharedRegion(const RegionOptions& opts) : file_(opts) {
  file_.attach([this](RegionFile::Attached how) { on_attached(how); });
  if (opts.read_only) wire();
}

// Points every part at the mapped region.
void SharedRegion::wire() {
  hdr_ = file_.header();
  uint8_t* base = file_.base();
  entries_ = EntryTable(base + hdr_->entries_off, hdr_->entry_stride, hdr_->max_objects, hdr_->max_key_bytes);
  index_ = HashIndex(reinterpret_cast<uint64_t*>(base + hdr_->buckets_off), hdr_->bucket_count,
                     &hdr_->tombstones, entries_);
  blocks_ = BlockAllocator(reinterpret_cast<uint64_t*>(base + hdr_->bitmap_off), hdr_->units, &hdr_->alloc_cursor);
  clock_ = ClockEvictor(entries_, &hdr_->clock_hand);
}

void SharedRegion::on_attached(RegionFile::Attached how) {
  wire();
  if (how == RegionFile::Attached::kCreated) return;
  lock();
  // Alone: rebuild everything derived. Joined: others keep the derived state
  // up to date; a damaged one (a counter or the free-stack top out of range)
  // is rebuilt, never trusted.
  if (how == RegionFile::Attached::kAlone) repair_locked(true);
  else if (!derived_state_sane_locked()) repair_locked(false);
  unlock();
  if (file_.options().reset) clear();
}

// ---------------------------------------------------------------- locking

void SharedRegion::lock() {
  if (read_only()) throw RegionError("shared region " + path() + " is attached read-only");
  int rc = pthread_mutex_lock(&hdr_->mutex);
  if (rc == EOWNERDEAD) {
    // The previous holder died inside a critical section: rebuild every
    // derived structure from the entries before anyone uses them.
    repair_locked(false);
    pthread_mutex_consistent(&hdr_->mutex);
  } else if (rc != 0) {
    throw RegionError("cannot lock shared region " + path() + ": " + strerror(rc) +
                      "; stop every process using it and attach again");
  }
}

void SharedRegion::unlock() { pthread_mutex_unlock(&hdr_->mutex); }

// Holds the region lock for a scope.
class SharedRegion::Locked {
 public:
  explicit Locked(SharedRegion* r) : r_(r) { r_->lock(); }
  ~Locked() { r_->unlock(); }
  Locked(const Locked&) = delete;
  Locked& operator=(const Locked&) = delete;

 private:
  SharedRegion* r_;
};

void SharedRegion::lock_and_leak_for_testing() { lock(); }

uint32_t* SharedRegion::free_stack() const {
  return reinterpret_cast<uint32_t*>(file_.base() + hdr_->free_off);
}

// ---------------------------------------------------------------- entries

void SharedRegion::free_entry_locked(uint32_t slot) {
  RegionEntry* e = entry(slot);
  switch (e->state) {
    case kReady:
      --hdr_->items;
      hdr_->used_bytes -= e->size;
      break;
    case kWriting:
      --hdr_->writing;
      break;
    case kRetired:
      --hdr_->retired;
      break;
    default:
      return;
  }
  blocks_.give_back(e->unit, e->units);
  hdr_->used_units -= e->units;
  store_release(e->gen, ++hdr_->global_gen);
  store_release(e->state, uint32_t(kFree));
  LeaseTable::clear(e);
  free_stack()[hdr_->free_top++] = slot;
}

// Takes a READY entry out of service (its bucket is already gone or replaced):
// freed now, or kept RETIRED until the readers holding it finish.
void SharedRegion::retire_or_free_locked(uint32_t slot, uint64_t now) {
  RegionEntry* e = entry(slot);
  if (e->state == kReady && LeaseTable::pinned(e, now)) {
    --hdr_->items;
    hdr_->used_bytes -= e->size;
    ++hdr_->retired;
    store_release(e->state, uint32_t(kRetired));
    return;
  }
  free_entry_locked(slot);
}

bool SharedRegion::evict_one_locked(uint64_t need_units, int32_t priority, uint64_t* run_start) {
  const ClockEvictor::Stop stop = clock_.step(now_ns(), priority);
  if (stop.found == ClockEvictor::Found::kNothing) return false;
  RegionEntry* e = entry(stop.slot);
  const uint64_t unit = e->unit, units = e->units;
  if (stop.found == ClockEvictor::Found::kVictim) {
    index_.erase_slot(stop.slot);
    bump(hdr_->evictions);
  } else if (stop.dead_writer) {
    bump(hdr_->reclaimed_writers);
  }
  free_entry_locked(stop.slot);
  *run_start = need_units ? blocks_.run_around(unit, units, need_units) : kNone;
  return true;
}

// ---------------------------------------------------------------- writers

std::optional<Reservation> SharedRegion::reserve(std::string_view key, uint64_t size, std::string_view aux,
                                                 bool evict, int32_t priority) {
  if (key.empty() || key.size() > hdr_->max_key_bytes)
    throw std::invalid_argument("key of " + std::to_string(key.size()) +
                                " bytes does not fit the shared region's max_key_bytes=" +
                                std::to_string(hdr_->max_key_bytes));
  if (aux.size() > kAuxMax)
    throw std::invalid_argument("metadata of " + std::to_string(aux.size()) +
                                " bytes exceeds the shared region limit of " + std::to_string(kAuxMax));
  const uint64_t block = hdr_->block_bytes;
  const uint64_t units = (size + block - 1) / block;
  const uint64_t hash = hash_key(key);
  Locked locked(this);
  auto no_room = [&] {
    if (evict) bump(hdr_->put_failures);
    return std::nullopt;
  };
  if (units > hdr_->units) {
    bump(hdr_->put_failures);
    return std::nullopt;
  }
  while (hdr_->free_top == 0) {
    uint64_t ignored;
    if (!evict || !evict_one_locked(0, priority, &ignored)) return no_room();
  }
  uint64_t unit = blocks_.find_free_run(units);
  while (unit == kNone)
    if (!evict || !evict_one_locked(units, priority, &unit)) return no_room();
  // Fill the entry completely before publishing its state: a death before the
  // state store leaves a FREE entry that repair returns to the free stack.
  uint32_t slot = free_stack()[--hdr_->free_top];
  RegionEntry* e = entry(slot);
  e->key_len = uint32_t(key.size());
  memcpy(e + 1, key.data(), key.size());
  e->hash = hash;
  e->unit = unit;
  e->units = units;
  e->size = size;
  e->aux_len = uint32_t(aux.size());
  memcpy(e->aux, aux.data(), aux.size());
  e->ref = 1;
  e->priority = priority;
  LeaseTable::claim_for_writing(e);
  LeaseTable::clear(e);
  uint64_t gen = ++hdr_->global_gen;
  store_release(e->gen, gen);
  blocks_.take(unit, units);
  hdr_->used_units += units;
  ++hdr_->writing;
  store_release(e->state, uint32_t(kWriting));
  return Reservation{slot, gen, unit * block, size};
}

bool SharedRegion::commit(const Reservation& r) {
  if (r.slot >= hdr_->max_objects) return false;
  Locked locked(this);
  RegionEntry* e = entry(r.slot);
  if (e->gen != r.gen || e->state != kWriting) return false;  // reclaimed or cleared meanwhile
  uint64_t pos = 0;
  int64_t old = index_.find(entries_.key(e), e->hash, &pos);
  // Publish the new version before retiring the old one: a death in between
  // leaves two READY versions, and repair keeps the newer.
  --hdr_->writing;
  ++hdr_->items;
  hdr_->used_bytes += e->size;
  store_release(e->state, uint32_t(kReady));
  if (old >= 0) {
    index_.replace(pos, r.slot, e->hash);
    retire_or_free_locked(uint32_t(old), now_ns());
  } else {
    index_.insert(r.slot, e->hash, hdr_->items);
  }
  bump(hdr_->puts);
  return true;
}

void SharedRegion::abort(const Reservation& r) {
  if (r.slot >= hdr_->max_objects) return;
  Locked locked(this);
  RegionEntry* e = entry(r.slot);
  if (e->gen == r.gen && e->state == kWriting) free_entry_locked(r.slot);
}

bool SharedRegion::put(std::string_view key, const void* src, uint64_t size, std::string_view aux,
                       int32_t priority) {
  auto r = reserve(key, size, aux, true, priority);
  if (!r) return false;
  if (size) memcpy(data() + r->offset, src, size);
  return commit(*r);
}

// ---------------------------------------------------------------- readers

ReadHandle SharedRegion::handle_locked(uint32_t slot) const {
  const RegionEntry* e = entry(slot);
  return ReadHandle{slot, e->gen, e->unit * hdr_->block_bytes, e->size,
                    std::string(reinterpret_cast<const char*>(e->aux), e->aux_len)};
}

std::optional<ReadHandle> SharedRegion::acquire(std::string_view key, double lease_s, bool count_stats) {
  const uint64_t hash = hash_key(key);
  Locked locked(this);
  int64_t idx = index_.find(key, hash);
  if (idx < 0) {
    if (count_stats) bump(hdr_->misses);
    return std::nullopt;
  }
  RegionEntry* e = entry(uint32_t(idx));
  e->ref = 1;
  LeaseTable::add(e, now_ns(), lease_s);
  if (count_stats) bump(hdr_->hits);
  return handle_locked(uint32_t(idx));
}

std::optional<std::pair<std::string, ReadHandle>> SharedRegion::pick_victim(double lease_s, int32_t priority) {
  Locked locked(this);
  const uint64_t now = now_ns();
  for (uint64_t tries = 0; tries <= hdr_->max_objects; ++tries) {
    const ClockEvictor::Stop stop = clock_.step(now, priority);
    if (stop.found == ClockEvictor::Found::kNothing) break;
    if (stop.found == ClockEvictor::Found::kUnusable) {  // free it and look on
      if (stop.dead_writer) bump(hdr_->reclaimed_writers);
      free_entry_locked(stop.slot);
      continue;
    }
    RegionEntry* e = entry(stop.slot);
    if (LeaseTable::add(e, now, lease_s)) return std::make_pair(std::string(entries_.key(e)), handle_locked(stop.slot));
  }
  return std::nullopt;
}

std::optional<int32_t> SharedRegion::priority_of(std::string_view key) {
  const uint64_t hash = hash_key(key);
  Locked locked(this);
  int64_t idx = index_.find(key, hash);
  if (idx < 0) return std::nullopt;
  return entry(uint32_t(idx))->priority;
}

bool SharedRegion::release(uint32_t slot, uint64_t gen) {
  if (slot >= hdr_->max_objects) return false;
  Locked locked(this);
  RegionEntry* e = entry(slot);
  if (e->gen != gen) return false;
  LeaseTable::release(e);
  if (e->state == kRetired && !LeaseTable::pinned(e, now_ns())) {
    free_entry_locked(slot);
    return true;  // it stayed intact until now
  }
  return e->state == kReady || e->state == kRetired;
}

bool SharedRegion::is_current(uint32_t slot, uint64_t gen) const {
  if (slot >= hdr_->max_objects) return false;
  const RegionEntry* e = entry(slot);
  uint32_t st = load_acquire(e->state);
  return load_acquire(e->gen) == gen && (st == kReady || st == kRetired);
}

std::optional<ReadHandle> SharedRegion::get(std::string_view key, void* out, uint64_t out_cap) {
  auto h = acquire(key, 30.0);
  if (!h) return std::nullopt;
  if (h->size > out_cap) {
    release(h->slot, h->gen);
    return std::nullopt;
  }
  if (h->size) memcpy(out, data() + h->offset, h->size);
  if (!release(h->slot, h->gen)) return std::nullopt;
  return h;
}

bool SharedRegion::contains(std::string_view key) {
  const uint64_t hash = hash_key(key);
  Locked locked(this);
  return index_.find(key, hash) >= 0;
}

void SharedRegion::contains_many(const std::string_view* keys, size_t n, uint8_t* out) {
  std::vector<uint64_t> hashes(n);
  for (size_t i = 0; i < n; ++i) hashes[i] = hash_key(keys[i]);
  Locked locked(this);
  for (size_t i = 0; i < n; ++i) out[i] = index_.find(keys[i], hashes[i]) >= 0;
}

bool SharedRegion::erase(std::string_view key) {
  const uint64_t hash = hash_key(key);
  Locked locked(this);
  uint64_t pos;
  int64_t idx = index_.find(key, hash, &pos);
  if (idx < 0) return false;
  index_.erase_at(pos);
  retire_or_free_locked(uint32_t(idx), now_ns());
  bump(hdr_->deletes);
  return true;
}

bool SharedRegion::erase_version(uint32_t slot, uint64_t gen, bool evicted) {
  if (slot >= hdr_->max_objects) return false;
  Locked locked(this);
  RegionEntry* e = entry(slot);
  if (e->gen != gen || e->state != kReady) return false;
  if (!index_.erase_slot(slot)) return false;
  retire_or_free_locked(slot, now_ns());
  bump(evicted ? hdr_->evictions : hdr_->deletes);
  return true;
}

std::vector<std::string> SharedRegion::keys() {
  std::vector<std::string> out;
  Locked locked(this);
  for (uint32_t i = 0; i < hdr_->max_objects; ++i) {
    const RegionEntry* e = entry(i);
    if (e->state == kReady) out.emplace_back(entries_.key(e));
  }
  return out;
}

void SharedRegion::clear() {
  Locked locked(this);
  for (uint32_t i = 0; i < hdr_->max_objects; ++i)
    if (entry(i)->state != kFree) free_entry_locked(i);
  index_.clear();
  blocks_.reset_cursor();  // an empty region starts packing from the front again
}

uint64_t SharedRegion::prefault(uint64_t max_bytes) {
  std::vector<std::pair<uint64_t, uint64_t>> extents;  // (offset, bytes) in data()
  uint64_t covered = 0;
  {
    Locked locked(this);
    for (uint32_t i = 0; i < hdr_->max_objects && covered < max_bytes; ++i) {
      const RegionEntry* e = entry(i);
      if (e->state != kReady || e->size == 0) continue;
      const uint64_t n = std::min<uint64_t>(e->size, max_bytes - covered);
      extents.emplace_back(e->unit * hdr_->block_bytes, n);
      covered += n;
    }
  }
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  bool use_madvise = true;
  uint64_t done = 0;
  for (const auto& [off, n] : extents) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data() + off) & ~(page - 1);
    const uintptr_t end = reinterpret_cast<uintptr_t>(data() + off + n);
    if (use_madvise) {
      if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ) == 0) {
        done += n;
        continue;
      }
      if (errno != EINVAL) break;  // EFAULT/ENOMEM: stop; this is only a hint
      use_madvise = false;         // kernel older than 5.14
    }
    for (uintptr_t p = begin; p < end; p += page) (void)*reinterpret_cast<volatile const uint8_t*>(p);
    done += n;
  }
  return done;
}

std::vector<ObjectInfo> SharedRegion::snapshot() const {
  std::vector<ObjectInfo> out;
  const uint32_t n = hdr_->max_objects;
  for (uint32_t i = 0; i < n; ++i) {
    const RegionEntry* e = entry(i);
    if (load_acquire(e->state) != kReady) continue;
    uint64_t gen = load_acquire(e->gen);
    ObjectInfo info;
    info.key.assign(reinterpret_cast<const char*>(e + 1),
                    std::min<uint32_t>(load_acquire(e->key_len), hdr_->max_key_bytes));
    info.size = load_acquire(e->size);
    info.aux.assign(reinterpret_cast<const char*>(e->aux), std::min<uint32_t>(load_acquire(e->aux_len), kAuxMax));
    std::atomic_thread_fence(std::memory_order_acquire);
    if (load_acquire(e->gen) == gen && load_acquire(e->state) == kReady) out.push_back(std::move(info));
  }
  return out;
}

RegionStats SharedRegion::stats() const {
  const RegionHeader* h = hdr_;
  RegionStats s;
  s.capacity = h->capacity;
  s.block_bytes = h->block_bytes;
  s.max_objects = h->max_objects;
  s.max_key_bytes = h->max_key_bytes;
  s.items = load_acquire(h->items);
  s.used_bytes = load_acquire(h->used_bytes);
  s.reserved_bytes = load_acquire(h->used_units) * h->block_bytes;
  s.writing = load_acquire(h->writing);
  s.retired = load_acquire(h->retired);
  s.hits = load_acquire(h->hits);
  s.misses = load_acquire(h->misses);
  s.puts = load_acquire(h->puts);
  s.put_failures = load_acquire(h->put_failures);
  s.evictions = load_acquire(h->evictions);
  s.deletes = load_acquire(h->deletes);
  s.repairs = load_acquire(h->repairs);
  s.reclaimed_writers = load_acquire(h->reclaimed_writers);
  return s;
}

size_t SharedRegion::reclaim() {
  Locked locked(this);
  size_t freed = 0;
  const uint64_t now = now_ns();
  for (uint32_t i = 0; i < hdr_->max_objects; ++i) {
    RegionEntry* e = entry(i);
    if (e->state == kWriting && LeaseTable::writer_dead(e)) {
      bump(hdr_->reclaimed_writers);
      free_entry_locked(i);
      ++freed;
    } else if (e->state == kRetired && !LeaseTable::pinned(e, now)) {
      free_entry_locked(i);
      ++freed;
    } else if (e->state == kReady) {
      LeaseTable::pinned(e, now);
    }
  }
  return freed;
}

// ---------------------------------------------------------------- repair

// Cheap invariants of the derived state in the header (no pass over the
// entries): what an attach checks before trusting a region others are using.
bool SharedRegion::derived_state_sane_locked() const {
  const RegionHeader* h = hdr_;
  return h->free_top <= h->max_objects &&
         uint64_t(h->free_top) + h->items + h->writing + h->retired == h->max_objects &&
         h->used_units <= h->units && h->used_bytes <= h->capacity && h->tombstones <= h->bucket_count;
}

void SharedRegion::repair_locked(bool sole) {
  rebuild_locked(sole);
  bump(hdr_->repairs);
}

void SharedRegion::rebuild_locked(bool sole) {
  RegionHeader* h = hdr_;
  const uint32_t n = h->max_objects;
  const uint64_t now = now_ns();
  blocks_.clear();
  h->used_bytes = h->used_units = h->items = h->writing = h->retired = 0;
  uint64_t max_gen = h->global_gen;
  auto drop = [&](RegionEntry* e) {
    e->state = kFree;
    LeaseTable::clear(e);
  };
  // Pass 1: validate each entry and rebuild the space accounting.
  for (uint32_t i = 0; i < n; ++i) {
    RegionEntry* e = entry(i);
    max_gen = std::max(max_gen, e->gen);
    uint32_t st = e->state;
    if (st == kFree) continue;
    bool sane = st <= kRetired && e->key_len >= 1 && e->key_len <= h->max_key_bytes &&
                e->aux_len <= kAuxMax && e->units <= h->units && e->unit <= h->units - e->units &&
                e->size <= e->units * h->block_bytes;
    if (!sane || blocks_.any(e->unit, e->units, true)) {
      drop(e);
      continue;
    }
    if (st == kWriting && (sole || LeaseTable::writer_dead(e))) {
      bump(h->reclaimed_writers);
      drop(e);
      continue;
    }
    if (sole) LeaseTable::clear(e);
    bool pinned = LeaseTable::pinned(e, now);
    if (st == kRetired && !pinned) {
      drop(e);
      continue;
    }
    blocks_.set(e->unit, e->units, true);
    h->used_units += e->units;
    if (st == kWriting) ++h->writing;
    if (st == kRetired) ++h->retired;
  }
  // Pass 2: one READY version per key (the newest) in freshly built buckets.
  index_.clear();
  h->free_top = 0;
  for (uint32_t i = 0; i < n; ++i) {
    RegionEntry* e = entry(i);
    if (e->state != kReady) continue;
    uint64_t pos;
    int64_t other = index_.find(entries_.key(e), e->hash, &pos);
    RegionEntry* loser = nullptr;
    if (other < 0) {
      index_.insert(i, e->hash, h->items + 1);
    } else if (entry(uint32_t(other))->gen > e->gen) {
      loser = e;
    } else {
      loser = entry(uint32_t(other));
      index_.replace(pos, i, e->hash);
      --h->items;
      h->used_bytes -= loser->size;
    }
    if (loser) {
      blocks_.give_back(loser->unit, loser->units);
      h->used_units -= loser->units;
      drop(loser);
    }
    if (loser != e) {
      ++h->items;
      h->used_bytes += e->size;
    }
  }
  // Pass 3: free stack and generations (every handle on a dropped entry dies).
  uint32_t* fs = free_stack();
  for (uint32_t i = n; i-- > 0;) {
    RegionEntry* e = entry(i);
    if (e->state == kFree) {
      e->gen = ++max_gen;
      fs[h->free_top++] = i;
    }
  }
  h->global_gen = max_gen;
  h->clock_hand %= n;
  if (h->alloc_cursor >= h->units) h->alloc_cursor = 0;
}

// ---------------------------------------------------------------- audit

std::vector<std::string> SharedRegion::check() {
  std::vector<std::string> problems;
  auto fail = [&](const std::string& s) { problems.push_back(s); };
  Locked locked(this);
  const RegionHeader* h = hdr_;
  const uint32_t n = h->max_objects;
  std::vector<uint64_t> bits((h->units + 63) / 64, 0);
  uint64_t used_bytes = 0, used_units = 0, items = 0, writing = 0, retired = 0;
  std::vector<uint8_t> in_free(n, 0);
  for (uint32_t k = 0; k < h->free_top; ++k) {
    uint32_t s = free_stack()[k];
    if (s >= n) fail("free stack holds out-of-range slot " + std::to_string(s));
    else if (in_free[s]++) fail("slot " + std::to_string(s) + " is twice on the free stack");
  }
  for (uint32_t i = 0; i < n; ++i) {
    const RegionEntry* e = entry(i);
    uint32_t st = e->state;
    if (st == kFree) {
      if (!in_free[i]) fail("free slot " + std::to_string(i) + " is not on the free stack");
      continue;
    }
    if (in_free[i]) fail("slot " + std::to_string(i) + " is in use but on the free stack");
    if (st > kRetired) {
      fail("slot " + std::to_string(i) + " has invalid state " + std::to_string(st));
      continue;
    }
    if (e->unit + e->units > h->units) {
      fail("slot " + std::to_string(i) + " extends past the data area");
      continue;
    }
    for (uint64_t u = e->unit; u < e->unit + e->units; ++u) {
      if ((bits[u >> 6] >> (u & 63)) & 1) {
        fail("slot " + std::to_string(i) + " overlaps another object at unit " + std::to_string(u));
        break;
      }
      bits[u >> 6] |= 1ull << (u & 63);
    }
    used_units += e->units;
    if (st == kWriting) ++writing;
    if (st == kRetired) ++retired;
    if (st == kReady) {
      ++items;
      used_bytes += e->size;
      if (index_.find(entries_.key(e), e->hash) != int64_t(i))
        fail("ready slot " + std::to_string(i) + " is not found through the index");
    }
  }
  if (memcmp(bits.data(), blocks_.words(), bits.size() * 8) != 0) fail("allocation bitmap differs from the entries");
  uint64_t live_buckets = 0, tombs = 0;
  for (auto& p : index_.audit(&live_buckets, &tombs)) fail(p);
  auto expect = [&](const char* what, uint64_t have, uint64_t want) {
    if (have != want)
      fail(std::string(what) + " is " + std::to_string(have) + ", entries say " + std::to_string(want));
  };
  expect("used_bytes", h->used_bytes, used_bytes);
  expect("used_units", h->used_units, used_units);
  expect("items", h->items, items);
  expect("live buckets", live_buckets, items);
  expect("writing", h->writing, writing);
  expect("retired", h->retired, retired);
  expect("tombstones", h->tombstones, tombs);
  expect("free slots", h->free_top, n - items - writing - retired);
  return problems;
}

}  // namespace stratacache
