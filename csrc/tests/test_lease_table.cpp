// C++ tests of LeaseTable (reader leases and writer liveness), run under
// ASan/UBSan by ctest: counted leases, expiry, leases of exited, zombie and
// pid-recycled processes protect nothing, full lease records, dead writers.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>

#include "check.h"
#include "lease_table.h"
#include "region_entries.h"

using namespace stratacache;

// A child that exits at once; returned unreaped (a zombie) so its pid stays taken.
static pid_t exited_child() {
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) _exit(0);
  siginfo_t info;
  CHECK(waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) == 0);  // exited, still a zombie
  return pid;
}

static void test_counted_leases_and_expiry() {
  TestEntries entries(1);
  entries.make_ready(0, "k", 1);
  RegionEntry* e = entries.at(0);
  const uint64_t now = now_ns();
  CHECK(!LeaseTable::pinned(e, now));
  CHECK(LeaseTable::add(e, now, 60.0) && LeaseTable::add(e, now, 0.001));
  CHECK(e->leases[0].count == 2 && e->leases[0].pid == uint32_t(getpid()));
  CHECK(e->leases[0].expiry_ns == now + 60000000000ull);  // extending never shortens
  LeaseTable::release(e);
  CHECK(LeaseTable::pinned(e, now));
  LeaseTable::release(e);
  CHECK(!LeaseTable::pinned(e, now) && e->leases[0].count == 0);
  CHECK(LeaseTable::add(e, now, 0.5));
  CHECK(LeaseTable::pinned(e, now + 400000000ull));
  CHECK(!LeaseTable::pinned(e, now + 500000000ull));  // expired: dropped
  CHECK(e->leases[0].count == 0);
  CHECK(LeaseTable::add(e, now, -3.0) && !LeaseTable::pinned(e, now));  // a negative lease is no lease
}

static void test_dead_and_recycled_holders() {
  TestEntries entries(1);
  entries.make_ready(0, "k", 1);
  RegionEntry* e = entries.at(0);
  const uint64_t now = now_ns(), far = now + 3600000000000ull;
  CHECK(LeaseTable::process_alive(uint32_t(getpid()), LeaseTable::self_start_time()));
  CHECK(LeaseTable::process_alive(uint32_t(getpid()), 0));
  CHECK(!LeaseTable::process_alive(uint32_t(getpid()), LeaseTable::self_start_time() + 1));  // recycled pid
  CHECK(!LeaseTable::process_alive(0, 0));
  const pid_t zombie = exited_child();
  CHECK(!LeaseTable::process_alive(uint32_t(zombie), 0));
  e->leases[3] = LeaseRecord{uint32_t(zombie), 1, 0, far};
  CHECK(!LeaseTable::pinned(e, now) && e->leases[3].count == 0);  // a dead reader's lease is dropped
  int status = 0;
  CHECK(waitpid(zombie, &status, 0) == zombie);
  CHECK(!LeaseTable::process_alive(uint32_t(zombie), 0));  // gone entirely
  // A live process with another start time is not the lease's holder.
  const pid_t parent = getppid();
  CHECK(LeaseTable::process_alive(uint32_t(parent), 0));
  e->leases[5] = LeaseRecord{uint32_t(parent), 1, 1, far};
  CHECK(!LeaseTable::pinned(e, now));
}

static void test_full_records() {
  TestEntries entries(1);
  entries.make_ready(0, "k", 1);
  RegionEntry* e = entries.at(0);
  const uint64_t now = now_ns(), far = now + 3600000000000ull;
  const uint32_t parent = uint32_t(getppid());  // a live process other than us
  for (LeaseRecord& l : e->leases) l = LeaseRecord{parent, 1, 0, far};
  CHECK(!LeaseTable::add(e, now, 1.0));  // all held by another live reader
  CHECK(LeaseTable::pinned(e, now));
  e->leases[6].expiry_ns = now;  // one expires: its record is reused
  CHECK(LeaseTable::add(e, now, 1.0) && e->leases[6].pid == uint32_t(getpid()));
  LeaseTable::clear(e);
  CHECK(!LeaseTable::pinned(e, now));
}

static void test_writer_liveness() {
  TestEntries entries(1);
  RegionEntry* e = entries.at(0);
  e->state = kWriting;
  LeaseTable::claim_for_writing(e);
  CHECK(!LeaseTable::writer_dead(e));
  const pid_t child = exited_child();
  e->owner_pid = uint32_t(child);
  e->owner_start = 0;
  CHECK(LeaseTable::writer_dead(e));
  int status = 0;
  CHECK(waitpid(child, &status, 0) == child);
}

int main() {
  test_counted_leases_and_expiry();
  test_dead_and_recycled_holders();
  test_full_records();
  test_writer_liveness();
  std::printf("test_lease_table: all passed\n");
  return 0;
}
