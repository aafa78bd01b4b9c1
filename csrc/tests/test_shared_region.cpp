// C++ tests of the shared-region store (run under ASan/UBSan by ctest):
// round trips, replacement, eviction against a model, leases, header errors,
// corrupt headers (every geometry field, random bit flips), a truncated
// region, threads, a process dying while holding the lock, and SIGKILLed
// writers, priority-aware eviction.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "shared_region.h"

using namespace stratacache;


static std::string region_path(const char* what) {
  return "/dev/shm/sc-shared-cpptest-" + std::to_string(getpid()) + "-" + what + ".region";
}

static RegionOptions options(const std::string& path, uint64_t capacity, uint32_t max_objects) {
  RegionOptions o;
  o.path = path;
  o.capacity = capacity;
  o.max_objects = max_objects;
  o.max_key_bytes = 64;
  o.block_bytes = 256;
  return o;
}

// Object bytes derived from (key, version): the first 8 bytes hold the
// version, so any reader can recompute and compare everything it got.
static std::vector<uint8_t> make_payload(int key, uint64_t version, size_t size) {
  std::vector<uint8_t> b(size);
  uint64_t x = version * 1000003 + uint64_t(key);
  for (size_t i = 0; i < size; i += 8) {  // splitmix64 stream, 8 bytes a step
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    memcpy(b.data() + i, &z, std::min<size_t>(8, size - i));
  }
  if (size >= 8) memcpy(b.data(), &version, 8);
  return b;
}

static bool payload_ok(int key, const uint8_t* p, size_t size) {
  if (size < 8) return false;
  uint64_t version;
  memcpy(&version, p, 8);
  auto want = make_payload(key, version, size);
  return memcmp(want.data(), p, size) == 0;
}

static std::string key_of(int i) { return "kv\x1fns\x1fkey-" + std::to_string(i); }

static void expect_consistent(SharedRegion& r) {
  auto problems = r.check();
  for (auto& p : problems) std::fprintf(stderr, "inconsistent: %s\n", p.c_str());
  CHECK(problems.empty());
}

static void test_round_trip_and_replacement() {
  auto path = region_path("basic");
  unlink(path.c_str());
  {
    SharedRegion r(options(path, 1 << 20, 64));
    std::vector<uint8_t> a(5000, 1), b(7000, 2), out(1 << 20, 0xEE);
    CHECK(r.put(key_of(1), a.data(), a.size(), "meta-a"));
    CHECK(r.put(key_of(2), b.data(), b.size(), "meta-b"));
    // Same prefix, different full key: both kept apart.
    CHECK(r.put(key_of(1) + "x", b.data(), 10, ""));
    for (size_t size : {9000u, 100u, 300000u, 1u}) {  // replace with bigger and smaller objects
      std::vector<uint8_t> v(size, uint8_t(size));
      CHECK(r.put(key_of(1), v.data(), v.size(), "meta-a2"));
      auto h = r.get(key_of(1), out.data(), out.size());
      CHECK(h && h->size == size && h->aux == "meta-a2" && memcmp(out.data(), v.data(), size) == 0);
      auto hb = r.get(key_of(2), out.data(), out.size());
      CHECK(hb && hb->size == b.size() && memcmp(out.data(), b.data(), b.size()) == 0);
    }
    CHECK(r.contains(key_of(1) + "x") && !r.contains(key_of(3)));
    std::string owned[3] = {key_of(1), key_of(3), key_of(2)};
    std::string_view ks[3] = {owned[0], owned[1], owned[2]};
    uint8_t found[3];
    r.contains_many(ks, 3, found);
    CHECK(found[0] == 1 && found[1] == 0 && found[2] == 1);
    CHECK(r.erase(key_of(2)) && !r.erase(key_of(2)) && !r.contains(key_of(2)));
    CHECK(r.keys().size() == 2);
    bool threw = false;
    try {
      r.put(std::string(65, 'k'), a.data(), 1, "");
    } catch (const std::invalid_argument& e) {
      threw = std::string(e.what()).find("max_key_bytes=64") != std::string::npos;
    }
    CHECK(threw);
    expect_consistent(r);
  }
  {  // persistence: a new attach sees the objects and counters
    SharedRegion r(options(path, 1 << 20, 64));
    CHECK(r.contains(key_of(1)) && r.stats().items == 2 && r.stats().puts >= 7);
    // Incompatible geometry is a clear error naming the path and the field.
    bool threw = false;
    try {
      SharedRegion bad(options(path, 2 << 20, 64));
    } catch (const RegionError& e) {
      std::string msg = e.what();
      threw = msg.find(path) != std::string::npos && msg.find("capacity=1048576") != std::string::npos;
    }
    CHECK(threw);
  }
  {  // a wrong layout version
    FILE* f = fopen(path.c_str(), "r+b");
    uint32_t v = 77;
    fseek(f, 8, SEEK_SET);
    fwrite(&v, 4, 1, f);
    fclose(f);
    bool threw = false;
    try {
      SharedRegion bad(options(path, 1 << 20, 64));
    } catch (const RegionError& e) {
      threw = std::string(e.what()).find("layout version 77") != std::string::npos;
    }
    CHECK(threw);
    auto o = options(path, 1 << 20, 64);
    o.reset = true;
    SharedRegion fresh(o);
    CHECK(fresh.stats().items == 0);
  }
  {  // permissions
    chmod(path.c_str(), 0644);
    bool threw = false;
    try {
      SharedRegion bad(options(path, 1 << 20, 64));
    } catch (const RegionError& e) {
      threw = std::string(e.what()).find("mode 0644") != std::string::npos;
    }
    CHECK(threw);
  }
  unlink(path.c_str());
}

static void test_eviction_against_model() {
  auto path = region_path("evict");
  unlink(path.c_str());
  SharedRegion r(options(path, 64 * 1024, 32));
  std::mt19937_64 rng(7);
  std::map<int, std::vector<uint8_t>> last;
  std::vector<uint8_t> out(64 * 1024);
  for (int step = 0; step < 4000; ++step) {
    int k = int(rng() % 60);
    if (rng() % 4) {
      auto v = make_payload(k, rng() | 1, 8 + rng() % 20000);
      CHECK(r.put(key_of(k), v.data(), v.size(), ""));  // never fails: nothing is pinned
      last[k] = v;
    } else {
      auto h = r.get(key_of(k), out.data(), out.size());
      if (h) CHECK(last.count(k) && h->size == last[k].size() && memcmp(out.data(), last[k].data(), h->size) == 0);
    }
    RegionStats s = r.stats();
    CHECK(s.reserved_bytes <= s.capacity && s.items <= 32);
  }
  CHECK(r.stats().evictions > 0);
  std::vector<uint8_t> huge(64 * 1024 + 1);
  CHECK(!r.put("huge", huge.data(), huge.size(), ""));
  expect_consistent(r);
  // Everything pinned: a put is refused, pinned objects survive, and a lease
  // that expires stops protecting.
  r.clear();
  std::vector<uint8_t> quarter(16 * 1024, 3);
  for (int i = 0; i < 4; ++i) {
    CHECK(r.put(key_of(i), quarter.data(), quarter.size(), ""));
    CHECK(r.acquire(key_of(i), i == 0 ? 0.05 : 60.0, false));
  }
  CHECK(!r.put("new", quarter.data(), 256, ""));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(r.put("new", quarter.data(), 256, ""));
  CHECK(!r.contains(key_of(0)) && r.contains(key_of(1)));
  expect_consistent(r);
  unlink(path.c_str());
}

static void test_threads() {
  auto path = region_path("threads");
  unlink(path.c_str());
  SharedRegion r(options(path, 1 << 20, 128));
  std::atomic<long> mismatches{0}, hits{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<uint8_t> out(64 * 1024);
      for (int step = 0; step < 3000; ++step) {
        int k = int(rng() % 40);
        uint64_t op = rng() % 10;
        if (op < 4) {
          auto v = make_payload(k, rng() | 1, 8 + rng() % 60000);
          r.put(key_of(k), v.data(), v.size(), "");
        } else if (op < 9) {
          auto h = r.get(key_of(k), out.data(), out.size());
          if (h) {
            ++hits;
            if (!payload_ok(k, out.data(), h->size)) ++mismatches;
          }
        } else {
          r.erase(key_of(k));
        }
      }
    });
  }
  // A prefaulter runs beside the writers (as a worker's background thread
  // does beside its loads and saves): it must neither corrupt nor block them.
  std::atomic<bool> writers_done{false};
  std::atomic<long> prefault_rounds{0};
  std::thread prefaulter([&] {
    while (!writers_done) {
      r.prefault(UINT64_MAX);
      ++prefault_rounds;
    }
  });
  for (auto& t : ts) t.join();
  writers_done = true;
  prefaulter.join();
  CHECK(mismatches == 0 && hits > 100 && prefault_rounds > 0);
  expect_consistent(r);
  const RegionStats s = r.stats();
  CHECK(r.prefault(UINT64_MAX) == s.used_bytes);
  if (s.used_bytes >= 1000) CHECK(r.prefault(1000) == 1000);
  unlink(path.c_str());
}

static void writer_loop(const std::string& path, uint64_t seed) {
  SharedRegion r(options(path, 1 << 20, 64));
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> out(256 * 1024);
  for (;;) {
    int k = int(rng() % 48);
    uint64_t op = rng() % 10;
    if (op < 7) {
      auto v = make_payload(k, rng() | 1, 8 + rng() % 100000);
      r.put(key_of(k), v.data(), v.size(), "");
    } else if (op < 9) {
      r.erase(key_of(k));
    } else {
      r.get(key_of(k), out.data(), out.size());
    }
  }
}

static void test_sigkilled_writers() {
  auto path = region_path("kill");
  unlink(path.c_str());
  SharedRegion r(options(path, 1 << 20, 64));
  std::mt19937_64 rng(99);
  std::vector<uint8_t> out(256 * 1024);
  for (int round = 0; round < 60; ++round) {
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
      writer_loop(path, uint64_t(round) + 1);
      _exit(0);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(1000 + rng() % 15000));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    r.reclaim();
    expect_consistent(r);
    RegionStats s = r.stats();
    CHECK(s.writing == 0 && s.reserved_bytes <= s.capacity);
    uint64_t bytes = 0;
    for (auto& k : r.keys()) {
      auto h = r.get(k, out.data(), out.size());
      CHECK(h);
      CHECK(payload_ok(std::stoi(k.substr(k.rfind('-') + 1)), out.data(), h->size));
      bytes += h->size;
    }
    CHECK(bytes == r.stats().used_bytes);
    auto v = make_payload(0, rng() | 1, 5000);  // still usable
    CHECK(r.put(key_of(0), v.data(), v.size(), ""));
  }
  std::fprintf(stderr, "kill test: %llu repairs, %llu dead writers reclaimed\n",
               (unsigned long long)r.stats().repairs, (unsigned long long)r.stats().reclaimed_writers);
  // And deterministically: a writer that dies between reserve and commit
  // leaves an invisible reservation whose space is reclaimed.
  uint64_t reclaimed = r.stats().reclaimed_writers;
  pid_t pid = fork();
  if (pid == 0) {
    SharedRegion child(options(path, 1 << 20, 64));
    CHECK(child.reserve("dying", 300000, ""));
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(r.stats().writing == 1 && !r.contains("dying"));
  CHECK(r.reclaim() == 1 && r.stats().reclaimed_writers == reclaimed + 1 && r.stats().writing == 0);
  expect_consistent(r);
  unlink(path.c_str());
}

static void test_death_while_holding_the_lock() {
  auto path = region_path("lockdeath");
  unlink(path.c_str());
  SharedRegion r(options(path, 1 << 20, 64));
  std::vector<uint8_t> v(1000, 7), out(1000);
  CHECK(r.put("kept", v.data(), v.size(), ""));
  uint64_t repairs = r.stats().repairs;
  pid_t pid = fork();
  if (pid == 0) {
    SharedRegion child(options(path, 1 << 20, 64));
    child.lock_and_leak_for_testing();
    raise(SIGKILL);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFSIGNALED(status));
  auto h = r.get("kept", out.data(), out.size());  // would block forever without robust repair
  CHECK(h && memcmp(out.data(), v.data(), v.size()) == 0);
  CHECK(r.stats().repairs == repairs + 1);
  expect_consistent(r);
  unlink(path.c_str());
}

// Byte offsets of the header's geometry fields (the layout of
// SharedRegion::Header; the Python test mirrors them).
struct HeaderField {
  const char* name;
  size_t offset, bytes;
};
static const HeaderField kGeometry[] = {
    {"header_bytes", 12, 4},  {"total_bytes", 16, 8},      {"capacity", 24, 8},    {"units", 32, 8},
    {"max_objects", 40, 4},   {"max_key_bytes", 44, 4},    {"block_bytes", 48, 4}, {"bucket_count", 52, 4},
    {"entry_stride", 56, 4},  {"aux_max", 60, 4},          {"leases_per_entry", 64, 4},
    {"mutex_bytes", 68, 4},   {"buckets_off", 72, 8},      {"entries_off", 80, 8}, {"free_off", 88, 8},
    {"bitmap_off", 96, 8},    {"data_off", 104, 8},        {"geometry_sum", 112, 8},
};

static void flip_bit(const std::string& path, size_t byte, int bit) {
  int fd = open(path.c_str(), O_RDWR);
  CHECK(fd >= 0);
  uint8_t b = 0;
  CHECK(pread(fd, &b, 1, off_t(byte)) == 1);
  b ^= uint8_t(1u << bit);
  CHECK(pwrite(fd, &b, 1, off_t(byte)) == 1);
  close(fd);
}

// The RegionError an attach with these options raises ("" if it attaches).
static std::string attach_error(RegionOptions o, bool read_only) {
  o.read_only = read_only;
  try {
    SharedRegion r(o);
  } catch (const RegionError& e) {
    return e.what();
  }
  return "";
}

// Runs fn in a child process; returns its exit status, or 128 + the signal
// that killed it, so a crash in the child fails the check instead of the test.
template <class Fn>
static int in_child(Fn fn) {
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) _exit(fn());
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

// A flipped high bit in any geometry field is refused before anything is
// dereferenced, with an error naming the file and the field, for read-write
// and read-only attaches; reset re-creates the region.
static void test_corrupt_geometry_is_refused() {
  const std::string path = region_path("geometry");
  unlink(path.c_str());
  const auto o = options(path, 1 << 20, 64);
  {
    SharedRegion r(o);
    auto p = make_payload(1, 1, 3000);
    CHECK(r.put(key_of(1), p.data(), p.size(), "aux"));
  }
  std::vector<uint8_t> pristine(4096);
  {
    int fd = open(path.c_str(), O_RDONLY);
    CHECK(pread(fd, pristine.data(), pristine.size(), 0) == ssize_t(pristine.size()));
    close(fd);
  }
  auto restore = [&] {
    int fd = open(path.c_str(), O_RDWR);
    CHECK(pwrite(fd, pristine.data(), pristine.size(), 0) == ssize_t(pristine.size()));
    close(fd);
  };
  for (const HeaderField& f : kGeometry) {
    flip_bit(path, f.offset + f.bytes - 1, 7);
    for (bool read_only : {false, true}) {
      const std::string what = attach_error(o, read_only);
      if (what.find(path) == std::string::npos || what.find(f.name) == std::string::npos)
        std::fprintf(stderr, "field %s (read_only=%d): got '%s'\n", f.name, int(read_only), what.c_str());
      CHECK(what.find(path) != std::string::npos && what.find(f.name) != std::string::npos);
    }
    restore();
  }
  // Random single-bit flips anywhere in the header page: never a signal, and an
  // attach that succeeds leaves a consistent region whose object reads back intact.
  std::mt19937_64 rng(24);
  for (int trial = 0; trial < 120; ++trial) {
    const size_t byte = rng() % (trial < 60 ? 128 : 4096);
    const int bit = int(rng() % 8);
    flip_bit(path, byte, bit);
    int rc = in_child([&] {
      try {
        SharedRegion r(o);
        if (!r.check().empty()) return 3;
        std::vector<uint8_t> out(3000);
        auto h = r.get(key_of(1), out.data(), out.size());
        if (h && (h->aux != "aux" || !payload_ok(1, out.data(), h->size))) return 4;
        return 0;
      } catch (const RegionError&) {
        return 2;
      }
    });
    if (rc != 0 && rc != 2) std::fprintf(stderr, "flip of byte %zu bit %d: child status %d\n", byte, bit, rc);
    CHECK(rc == 0 || rc == 2);
    restore();
  }
  flip_bit(path, 52, 0);  // bucket_count off by one: refused, then reset re-creates
  auto ro = o;
  ro.reset = true;
  SharedRegion fresh(ro);
  CHECK(fresh.stats().items == 0);
  expect_consistent(fresh);
  unlink(path.c_str());
}

// A truncated region is refused naming the sizes; with reset it is re-created
// at full size, not refused.
static void test_truncated_region() {
  const std::string path = region_path("truncated");
  unlink(path.c_str());
  const auto o = options(path, 1 << 20, 64);
  uint64_t full = 0;
  {
    SharedRegion r(o);
    struct stat st;
    CHECK(stat(path.c_str(), &st) == 0);
    full = uint64_t(st.st_size);
    CHECK(uint64_t(st.st_blocks) * 512 >= full);  // reserved at creation
  }
  CHECK(truncate(path.c_str(), off_t(full / 2)) == 0);
  for (bool read_only : {false, true}) {
    const std::string what = attach_error(o, read_only);
    CHECK(what.find("truncated") != std::string::npos && what.find(path) != std::string::npos);
  }
  auto ro = o;
  ro.reset = true;
  {
    SharedRegion again(ro);
    auto p = make_payload(2, 1, 5000);
    CHECK(again.put(key_of(2), p.data(), p.size(), ""));
    expect_consistent(again);
  }
  struct stat st;
  CHECK(stat(path.c_str(), &st) == 0 && uint64_t(st.st_size) == full);
  unlink(path.c_str());
}

// Priorities: a region filled with priority-10 objects keeps every one of
// them under a random stream of priority-0 puts (which fail, or evict each
// other once some fit), also through the hand-off path (pick_victim), a
// repair and a re-attach; priority-10 puts then evict the priority-0 objects.
static void test_priorities() {
  auto path = region_path("priority");
  unlink(path.c_str());
  const uint64_t capacity = 256 * 1024;
  SharedRegion r(options(path, capacity, 64));
  std::mt19937_64 rng(10);
  std::map<int, std::vector<uint8_t>> params;  // keys 0..: priority 10
  uint64_t filled = 0;
  for (int k = 0; filled < capacity - 24 * 1024; ++k) {
    auto v = make_payload(k, 1, 1000 + rng() % 12000);
    CHECK(r.put(key_of(k), v.data(), v.size(), "params", 10));
    filled += (v.size() + 255) / 256 * 256;
    params[k] = v;
  }
  CHECK(r.stats().evictions == 0 && r.priority_of(key_of(0)) == 10);
  auto params_intact = [&] {
    std::vector<uint8_t> out(capacity);
    for (auto& [k, v] : params) {
      auto h = r.get(key_of(k), out.data(), out.size());
      CHECK(h && h->size == v.size() && h->aux == "params" && memcmp(out.data(), v.data(), v.size()) == 0);
    }
  };
  long stored = 0, refused = 0;
  for (int step = 0; step < 600; ++step) {
    const int k = 1000 + int(rng() % 80);
    auto v = make_payload(k, uint64_t(step) + 1, 8 + rng() % 30000);
    if (r.put(key_of(k), v.data(), v.size(), "kv", 0)) {
      ++stored;
      CHECK(r.priority_of(key_of(k)) == 0);
    } else {
      ++refused;
    }
    if (step % 50 == 0) {  // the hand-off path finds only priority-0 victims
      auto victim = r.pick_victim(1.0, 0);
      if (victim) {
        CHECK(std::stoi(victim->first.substr(victim->first.rfind('-') + 1)) >= 1000);
        CHECK(r.erase_version(victim->second.slot, victim->second.gen, true));
        r.release(victim->second.slot, victim->second.gen);
      }
    }
  }
  CHECK(stored > 50 && refused > 0 && r.stats().evictions > 0);
  params_intact();
  expect_consistent(r);
  // Nothing of priority <= -1 exists: the hand-off path reports nothing.
  CHECK(!r.pick_victim(1.0, -1));
  CHECK(r.put("kv-last", params[0].data(), 2000, "kv", 0));  // priority-0 objects still take each other's room
  // Priorities are in the entries, so a repair (here: a process that died
  // holding the lock) and a re-attach keep them.
  pid_t pid = fork();
  if (pid == 0) {
    SharedRegion child(options(path, capacity, 64));
    child.lock_and_leak_for_testing();
    raise(SIGKILL);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(r.priority_of(key_of(0)) == 10);
  {
    SharedRegion again(options(path, capacity, 64));
    CHECK(again.priority_of(key_of(0)) == 10);
    std::vector<uint8_t> big(40000, 9);
    CHECK(!again.put("too-low", big.data(), big.size(), "", -1));  // nothing it may evict
  }
  params_intact();
  // Higher-priority puts evict lower-priority ones: a region full of
  // priority-0 objects takes priority-10 ones, each evicting one of them,
  // after which priority-0 puts are refused.
  r.clear();
  const uint64_t object = 16 * 1024;
  for (int k = 0; k < int(capacity / object); ++k) {
    auto v = make_payload(2000 + k, 1, object);
    CHECK(r.put(key_of(2000 + k), v.data(), v.size(), "kv", 0));
  }
  CHECK(r.stats().reserved_bytes == capacity);
  const uint64_t evictions = r.stats().evictions;
  params.clear();
  for (int k = 0; k < int(capacity / object); ++k) {
    auto v = make_payload(3000 + k, 1, object);
    CHECK(r.put(key_of(3000 + k), v.data(), v.size(), "params", 10));
    params[3000 + k] = v;
  }
  CHECK(r.stats().evictions == evictions + capacity / object);
  for (auto& k : r.keys()) CHECK(r.priority_of(k) == 10);
  params_intact();
  auto v = make_payload(1, 1, 300);
  CHECK(!r.put(key_of(1), v.data(), v.size(), "kv", 0));
  expect_consistent(r);
  unlink(path.c_str());
}

int main() {
  test_round_trip_and_replacement();
  test_eviction_against_model();
  test_threads();
  test_death_while_holding_the_lock();
  test_sigkilled_writers();
  test_corrupt_geometry_is_refused();
  test_truncated_region();
  test_priorities();
  std::printf("test_shared_region: all passed\n");
  return 0;
}
