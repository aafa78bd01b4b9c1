// Open-addressing hash index of the shared region (see hash_index.h).
#include "hash_index.h"

#include <cstring>

namespace stratacache {

uint64_t hash_key(std::string_view key) {
  const auto* p = reinterpret_cast<const uint8_t*>(key.data());
  size_t n = key.size();
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t(n) * 0xFF51AFD7ED558CCDull);
  auto mix = [](uint64_t v) {
    v ^= v >> 33;
    v *= 0xC4CEB9FE1A85EC53ull;
    v ^= v >> 29;
    return v;
  };
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    h = (h ^ mix(v)) * 0x9FB21C651E98DF25ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  uint64_t tail = 0;
  if (n) memcpy(&tail, p, n);
  h = (h ^ mix(tail ^ (uint64_t(n) << 56))) * 0x9FB21C651E98DF25ull;
  return mix(h);
}

int64_t HashIndex::find(std::string_view key, uint64_t hash, uint64_t* pos) const {
  const uint64_t mask = count_ - 1;
  const uint32_t tag = uint32_t(hash >> 32);
  for (uint64_t probe = 0; probe <= mask; ++probe) {
    uint64_t p = (hash + probe) & mask;
    uint64_t v = b_[p];
    if (v == 0) return -1;
    if (v == kTomb || uint32_t(v >> 32) != tag) continue;
    uint64_t idx = (v & 0xffffffffull) - 1;
    if (idx >= entries_.size()) continue;
    const RegionEntry* e = entries_.at(uint32_t(idx));
    if (e->state == kReady && e->hash == hash && e->key_len == key.size() &&
        memcmp(e + 1, key.data(), key.size()) == 0) {
      if (pos) *pos = p;
      return int64_t(idx);
    }
  }
  return -1;
}

void HashIndex::insert(uint32_t slot, uint64_t hash, uint64_t live_items) {
  if ((live_items + *tombstones_) * 4 > count_ * 3) {
    rebuild();  // re-inserts every READY entry, this one included
    if (entries_.at(slot)->state == kReady) return;
  }
  for (uint64_t probe = 0; probe < count_; ++probe) {
    uint64_t p = (hash + probe) & (count_ - 1);
    if (b_[p] == 0 || b_[p] == kTomb) {
      if (b_[p] == kTomb) --*tombstones_;
      store_release(b_[p], word(slot, hash));
      return;
    }
  }
}

void HashIndex::replace(uint64_t pos, uint32_t slot, uint64_t hash) { store_release(b_[pos], word(slot, hash)); }

void HashIndex::erase_at(uint64_t pos) {
  store_release(b_[pos], kTomb);
  ++*tombstones_;
}

bool HashIndex::erase_slot(uint32_t slot) {
  const RegionEntry* e = entries_.at(slot);
  uint64_t pos;
  if (find(entries_.key(e), e->hash, &pos) != int64_t(slot)) return false;
  erase_at(pos);
  return true;
}

void HashIndex::rebuild() {
  memset(b_, 0, count_ * 8);
  *tombstones_ = 0;
  for (uint32_t i = 0; i < entries_.size(); ++i) {
    const RegionEntry* e = entries_.at(i);
    if (e->state != kReady) continue;
    for (uint64_t probe = 0; probe < count_; ++probe) {
      uint64_t p = (e->hash + probe) & (count_ - 1);
      if (b_[p] == 0) {
        b_[p] = word(i, e->hash);
        break;
      }
    }
  }
}

void HashIndex::clear() {
  memset(b_, 0, count_ * 8);
  *tombstones_ = 0;
}

std::vector<std::string> HashIndex::audit(uint64_t* live, uint64_t* tombs) const {
  std::vector<std::string> problems;
  *live = *tombs = 0;
  for (uint64_t p = 0; p < count_; ++p) {
    uint64_t v = b_[p];
    if (v == kTomb) {
      ++*tombs;
    } else if (v) {
      ++*live;
      uint64_t idx = (v & 0xffffffffull) - 1;
      if (idx >= entries_.size() || entries_.at(uint32_t(idx))->state != kReady)
        problems.push_back("bucket " + std::to_string(p) + " points at a slot that is not ready");
    }
  }
  return problems;
}

}  // namespace stratacache
