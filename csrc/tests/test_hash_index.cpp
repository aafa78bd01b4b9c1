// C++ tests of HashIndex (the shared region's key index), run under
// ASan/UBSan by ctest: random insert/replace/erase against a std::map with
// hashes forced to collide, full-key comparison, tombstone clean-up, audit.
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "hash_index.h"
#include "region_entries.h"

using namespace stratacache;

static std::string key_of(int i) { return "kv\x1fns\x1fkey-" + std::to_string(i); }

static void test_against_model(bool colliding) {
  constexpr uint32_t kSlots = 64;
  TestEntries entries(kSlots);
  std::vector<uint64_t> buckets(128, 0);
  uint64_t tombstones = 0;
  HashIndex index(buckets.data(), buckets.size(), &tombstones, entries.table);
  std::map<std::string, uint32_t> model;  // key -> slot
  std::vector<uint32_t> free_slots;
  for (uint32_t i = kSlots; i-- > 0;) free_slots.push_back(i);
  // Colliding: every key has one of 3 hashes, so lookups must compare keys.
  auto hash_of = [&](const std::string& k) { return colliding ? 0xABCD000000000000ull + k.size() % 3 : hash_key(k); };
  std::mt19937_64 rng(colliding ? 5 : 6);
  for (int step = 0; step < 20000; ++step) {
    const std::string k = key_of(int(rng() % 90));
    const uint64_t h = hash_of(k);
    auto it = model.find(k);
    uint64_t pos = 0;
    const int64_t found = index.find(k, h, &pos);
    CHECK(found == (it == model.end() ? -1 : int64_t(it->second)));
    const uint64_t op = rng() % 3;
    if (op == 0 && !free_slots.empty()) {  // put: a fresh slot, replacing any older version
      const uint32_t slot = free_slots.back();
      free_slots.pop_back();
      entries.make_ready(slot, k, h);
      if (it != model.end()) {
        index.replace(pos, slot, h);
        entries.at(it->second)->state = kFree;
        free_slots.push_back(it->second);
        it->second = slot;
      } else {
        model[k] = slot;
        index.insert(slot, h, model.size());
      }
    } else if (op == 1 && it != model.end()) {  // erase
      CHECK(index.erase_slot(it->second));
      CHECK(!index.erase_slot(it->second));
      entries.at(it->second)->state = kFree;
      free_slots.push_back(it->second);
      model.erase(it);
    }
    uint64_t live = 0, tombs = 0;
    CHECK(index.audit(&live, &tombs).empty());
    CHECK(live == model.size() && tombs == tombstones);
    CHECK((live + tombs) * 4 <= buckets.size() * 3 + 4);  // tombstones get cleaned up
  }
  // A key that shares hash and length with a stored one is still a miss.
  for (auto& [k, slot] : model) {
    std::string other = k;
    other.back() ^= 1;
    if (!model.count(other)) CHECK(index.find(other, hash_of(k)) == -1);
  }
  index.rebuild();
  uint64_t live = 0, tombs = 0;
  CHECK(index.audit(&live, &tombs).empty() && live == model.size() && tombs == 0);
  for (auto& [k, slot] : model) CHECK(index.find(k, hash_of(k)) == int64_t(slot));
  index.clear();
  for (auto& [k, slot] : model) CHECK(index.find(k, hash_of(k)) == -1);
}

static void test_audit_reports_a_stale_bucket() {
  TestEntries entries(4);
  std::vector<uint64_t> buckets(8, 0);
  uint64_t tombstones = 0;
  HashIndex index(buckets.data(), buckets.size(), &tombstones, entries.table);
  entries.make_ready(2, "a", hash_key("a"));
  index.insert(2, hash_key("a"), 1);
  entries.at(2)->state = kFree;  // freed behind the index's back
  uint64_t live = 0, tombs = 0;
  auto problems = index.audit(&live, &tombs);
  CHECK(problems.size() == 1 && problems[0].find("not ready") != std::string::npos && live == 1);
  CHECK(index.find("a", hash_key("a")) == -1);  // a non-READY slot is never returned
}

static void test_hash_is_stable() {
  // Regions persist and the geometry checksum is a hash_key too: its values
  // must not change between builds (these are the layout-2 values).
  CHECK(hash_key("kv\x1fns\x1fkey-1") == 0x73eba5aa7d7fe6c0ull);
  CHECK(hash_key("") == 0x50f633dd1da3511eull);
  CHECK(hash_key("abcdefghij") == 0xd5a30eac7b9cf49bull);
}

int main() {
  test_against_model(false);
  test_against_model(true);
  test_audit_reports_a_stale_bucket();
  test_hash_is_stable();
  std::printf("test_hash_index: all passed\n");
  return 0;
}
