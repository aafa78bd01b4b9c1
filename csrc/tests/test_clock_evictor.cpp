// C++ tests of ClockEvictor, run under ASan/UBSan by ctest: second chance,
// leased objects are skipped, unusable space is reported, and the priority
// rule (an object is a victim only for an incoming object of at least its
// priority), checked against a brute-force model over random tables.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <set>

#include "check.h"
#include "clock_evictor.h"
#include "lease_table.h"
#include "region_entries.h"

using namespace stratacache;

using Found = ClockEvictor::Found;

static void test_second_chance_and_leases() {
  TestEntries entries(4);
  uint64_t hand = 0;
  ClockEvictor clock(entries.table, &hand);
  for (uint32_t i = 0; i < 4; ++i) entries.make_ready(i, "k" + std::to_string(i), i);
  entries.at(0)->ref = 1;
  const uint64_t now = now_ns();
  CHECK(LeaseTable::add(entries.at(1), now, 60.0));
  auto stop = clock.step(now, 0);
  CHECK(stop.found == Found::kVictim && stop.slot == 2 && hand == 3);  // 0 got a second chance, 1 is leased
  CHECK(entries.at(0)->ref == 0 && entries.at(1)->ref == 0);
  stop = clock.step(now, 0);
  CHECK(stop.found == Found::kVictim && stop.slot == 3);
  stop = clock.step(now, 0);
  CHECK(stop.found == Found::kVictim && stop.slot == 0);  // its second chance is used up
  for (uint32_t i = 0; i < 4; ++i)
    if (i != 1) entries.at(i)->state = kFree;
  stop = clock.step(now, 0);
  CHECK(stop.found == Found::kNothing);  // only a leased object is left
  CHECK(clock.step(now + 61000000000ull, 0).found == Found::kVictim);  // its lease expired
}

static void test_unusable_space_is_reported() {
  TestEntries entries(3);
  uint64_t hand = 0;
  ClockEvictor clock(entries.table, &hand);
  const uint64_t now = now_ns();
  entries.make_ready(0, "writing", 0);
  entries.at(0)->state = kWriting;
  LeaseTable::claim_for_writing(entries.at(0));  // a live writer: left alone
  entries.make_ready(1, "retired-held", 1);
  entries.at(1)->state = kRetired;
  CHECK(LeaseTable::add(entries.at(1), now, 60.0));
  entries.make_ready(2, "dead-writer", 2);
  entries.at(2)->state = kWriting;
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) _exit(0);
  int status = 0;
  CHECK(waitpid(child, &status, 0) == child);
  entries.at(2)->owner_pid = uint32_t(child);
  entries.at(2)->owner_start = 0;
  auto stop = clock.step(now, 0);
  CHECK(stop.found == Found::kUnusable && stop.slot == 2 && stop.dead_writer);
  entries.at(2)->state = kFree;
  CHECK(clock.step(now, 0).found == Found::kNothing);
  LeaseTable::release(entries.at(1));  // the last reader of the retired version leaves
  stop = clock.step(now, 0);
  CHECK(stop.found == Found::kUnusable && stop.slot == 1 && !stop.dead_writer);
}

// Priorities: random tables of READY objects with random priorities, leases
// and reference bits. A victim is never of a higher priority than the
// incoming object, and "nothing" is only reported when no unleased object of
// priority <= incoming exists.
static void test_priorities_against_model() {
  std::mt19937_64 rng(18);
  const int32_t priorities[] = {-5, 0, 3, 10};
  for (int trial = 0; trial < 400; ++trial) {
    const uint32_t n = 1 + uint32_t(rng() % 24);
    TestEntries entries(n);
    uint64_t hand = rng() % n;
    ClockEvictor clock(entries.table, &hand);
    const uint64_t now = now_ns();
    std::set<uint32_t> evictable_by[4];
    for (uint32_t i = 0; i < n; ++i) {
      const int32_t p = priorities[rng() % 4];
      entries.make_ready(i, "k" + std::to_string(i), i, p);
      entries.at(i)->ref = uint32_t(rng() % 2);
      const bool leased = rng() % 4 == 0;
      if (leased) CHECK(LeaseTable::add(entries.at(i), now, 60.0));
      for (int j = 0; j < 4; ++j)
        if (!leased && p <= priorities[j]) evictable_by[j].insert(i);
    }
    const int j = int(rng() % 4);
    const int32_t incoming = priorities[j];
    // Evict until nothing is left for this priority: exactly the model's set goes.
    std::set<uint32_t> taken;
    for (;;) {
      auto stop = clock.step(now, incoming);
      CHECK(stop.found != Found::kUnusable);
      if (stop.found == Found::kNothing) break;
      CHECK(entries.at(stop.slot)->priority <= incoming);
      CHECK(taken.insert(stop.slot).second);
      entries.at(stop.slot)->state = kFree;
    }
    CHECK(taken == evictable_by[j]);
    for (uint32_t i = 0; i < n; ++i)
      if (entries.at(i)->state == kReady && entries.at(i)->priority > incoming)
        CHECK(!evictable_by[j].count(i));
  }
  CHECK(ClockEvictor::eligible(0, 0) && ClockEvictor::eligible(0, 10) && !ClockEvictor::eligible(10, 0));
}

int main() {
  test_second_chance_and_leases();
  test_unusable_space_is_reported();
  test_priorities_against_model();
  std::printf("test_clock_evictor: all passed\n");
  return 0;
}
