// C++ tests of BlockAllocator (the shared region's bitmap allocator), run
// under ASan/UBSan by ctest: random take/give-back against a model, next-fit
// from the cursor with wrap-around, word-boundary runs, run_around.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "block_allocator.h"
#include "check.h"

using namespace stratacache;

// Whether [start, start + len) is all free in the model.
static bool model_free(const std::vector<bool>& used, uint64_t start, uint64_t len) {
  if (start + len > used.size()) return false;
  for (uint64_t i = start; i < start + len; ++i)
    if (used[i]) return false;
  return true;
}

static bool model_has_run(const std::vector<bool>& used, uint64_t len) {
  uint64_t run = 0;
  for (bool u : used) {
    run = u ? 0 : run + 1;
    if (run >= len) return true;
  }
  return false;
}

static void test_random_against_model() {
  for (uint64_t units : {1ull, 63ull, 64ull, 65ull, 1000ull, 4096ull}) {
    std::vector<uint64_t> words((units + 63) / 64, 0);
    uint64_t cursor = 0;
    BlockAllocator a(words.data(), units, &cursor);
    std::vector<bool> used(units, false);
    std::vector<std::pair<uint64_t, uint64_t>> live;
    std::mt19937_64 rng(units);
    for (int step = 0; step < 3000; ++step) {
      if (live.empty() || rng() % 3) {
        const uint64_t need = 1 + rng() % std::max<uint64_t>(units / 4, 1) + (rng() % 16 == 0 ? 64 : 0);
        const uint64_t at = a.find_free_run(need);
        if (at == kNone) {
          CHECK(!model_has_run(used, need));  // never a false "full"
          continue;
        }
        CHECK(model_free(used, at, need));  // never a used unit handed out
        a.take(at, need);
        CHECK(cursor == at + need);
        for (uint64_t i = at; i < at + need; ++i) used[i] = true;
        live.emplace_back(at, need);
      } else {
        const size_t k = rng() % live.size();
        auto [start, len] = live[k];
        live[k] = live.back();
        live.pop_back();
        a.give_back(start, len);
        for (uint64_t i = start; i < start + len; ++i) used[i] = false;
      }
      for (uint64_t i = 0; i < units; ++i) CHECK(bool((words[i >> 6] >> (i & 63)) & 1) == used[i]);
    }
  }
}

static void test_next_fit_and_wrap() {
  std::vector<uint64_t> words(2, 0);
  uint64_t cursor = 0;
  BlockAllocator a(words.data(), 128, &cursor);
  a.take(0, 10);
  CHECK(a.find_free_run(5) == 10);  // next fit: after the cursor
  a.take(10, 100);
  a.give_back(0, 10);
  CHECK(a.find_free_run(18) == 110);  // the tail first
  CHECK(a.find_free_run(19) == kNone);  // 18 free at the tail, 10 at the head: no run of 19
  CHECK(a.find_free_run(10) == 110);
  a.take(110, 18);
  CHECK(a.find_free_run(10) == 0);  // wraps to the head
  CHECK(a.find_free_run(0) == 0);
  a.reset_cursor();
  CHECK(cursor == 0);
  CHECK(a.any(0, 10, false) && !a.any(0, 10, true) && a.any(5, 10, true) && !a.any(10, 64, false));
  a.clear();
  CHECK(!a.any(0, 128, true));
}

static void test_run_around() {
  std::vector<uint64_t> words(2, 0);
  uint64_t cursor = 0;
  BlockAllocator a(words.data(), 100, &cursor);
  a.set(0, 100, true);
  a.give_back(40, 5);            // the freed victim
  a.give_back(30, 10);           // free neighbours on the left
  a.give_back(45, 3);            // and on the right
  CHECK(a.run_around(40, 5, 5) == 40);
  CHECK(a.run_around(40, 5, 18) == 30);  // 30..48 holds exactly 18
  CHECK(a.run_around(40, 5, 19) == kNone);
  a.give_back(96, 4);
  CHECK(a.run_around(96, 4, 4) == 96 && a.run_around(96, 4, 5) == kNone);  // stops at the end
}

int main() {
  test_random_against_model();
  test_next_fit_and_wrap();
  test_run_around();
  std::printf("test_block_allocator: all passed\n");
  return 0;
}
