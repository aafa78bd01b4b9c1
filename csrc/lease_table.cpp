// Reader leases and writer liveness (see lease_table.h).
#include "lease_table.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace stratacache {
namespace {

// Start time and zombie state of a process, from /proc, so a recycled pid is
// not mistaken for the process that took a lease.
struct ProcInfo {
  bool exists = false;
  bool zombie = false;
  uint64_t start = 0;
};

ProcInfo proc_info(pid_t pid) {
  ProcInfo info;
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return info;
  char buf[1024];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return info;
  buf[n] = 0;
  char* p = strrchr(buf, ')');
  if (!p || p[1] != ' ') return info;
  info.exists = true;
  p += 2;  // field 3: state
  info.zombie = (*p == 'Z' || *p == 'X');
  for (int field = 3; field < 22 && *p; ++p)
    if (*p == ' ') ++field;
  info.start = strtoull(p, nullptr, 10);
  return info;
}

}  // namespace

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

uint64_t LeaseTable::self_start_time() {
  static std::atomic<int> cached_pid{0};
  static std::atomic<uint64_t> cached_start{0};
  int pid = getpid();
  if (cached_pid.load(std::memory_order_acquire) != pid) {
    cached_start.store(proc_info(pid).start, std::memory_order_relaxed);
    cached_pid.store(pid, std::memory_order_release);
  }
  return cached_start.load(std::memory_order_relaxed);
}

bool LeaseTable::process_alive(uint32_t pid, uint64_t start) {
  if (pid == 0) return false;
  if (pid == uint32_t(getpid())) return start == 0 || start == self_start_time();
  if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
  ProcInfo info = proc_info(pid_t(pid));
  if (!info.exists) return true;  // no /proc (or it just exited): trust kill()
  if (info.zombie) return false;
  return start == 0 || info.start == 0 || info.start == start;
}

bool LeaseTable::pinned(RegionEntry* e, uint64_t now) {
  bool held = false;
  for (LeaseRecord& l : e->leases) {
    if (l.count == 0) continue;
    if (l.expiry_ns <= now || !process_alive(l.pid, l.start)) {
      l = LeaseRecord{};
      continue;
    }
    held = true;
  }
  return held;
}

bool LeaseTable::add(RegionEntry* e, uint64_t now, double lease_s) {
  const uint64_t expiry = now + uint64_t(std::max(lease_s, 0.0) * 1e9);
  const uint32_t pid = uint32_t(getpid());
  LeaseRecord* empty = nullptr;
  for (LeaseRecord& l : e->leases) {
    if (l.count && l.pid == pid) {
      ++l.count;
      l.expiry_ns = std::max(l.expiry_ns, expiry);
      return true;
    }
    if (!l.count && !empty) empty = &l;
  }
  if (!empty) {  // all records taken: drop dead and expired ones
    pinned(e, now);
    for (LeaseRecord& l : e->leases)
      if (!l.count) {
        empty = &l;
        break;
      }
  }
  if (!empty) return false;
  *empty = LeaseRecord{pid, 1, self_start_time(), expiry};
  return true;
}

void LeaseTable::release(RegionEntry* e) {
  const uint32_t pid = uint32_t(getpid());
  for (LeaseRecord& l : e->leases) {
    if (l.count && l.pid == pid) {
      if (--l.count == 0) l = LeaseRecord{};
      return;
    }
  }
}

void LeaseTable::clear(RegionEntry* e) {
  for (LeaseRecord& l : e->leases) l = LeaseRecord{};
}

void LeaseTable::claim_for_writing(RegionEntry* e) {
  e->owner_pid = uint32_t(getpid());
  e->owner_start = self_start_time();
}

}  // namespace stratacache
