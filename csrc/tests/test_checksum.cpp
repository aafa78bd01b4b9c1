// C++ tests of the checksum64 word loops (run under ASan/UBSan by ctest).
#include <random>
#include <set>
#include <vector>

#include "checksum.h"
#include "check.h"

using namespace stratacache::checksum;

// Byte-at-a-time restatement of the definition in checksum.h.
static uint64_t slow_checksum(const std::vector<uint8_t>& b) {
  uint64_t sum = 0;
  for (size_t i = 0; i < (b.size() + 7) / 8; ++i) {
    uint64_t w = 0;
    for (size_t k = 0; k < 8 && i * 8 + k < b.size(); ++k) w |= uint64_t(b[i * 8 + k]) << (8 * k);
    sum += mix64(w ^ ((i + 1) * kPosition));
  }
  return mix64(sum ^ mix64(b.size() + kLength));
}

int main() {
  std::mt19937_64 rng(42);
  for (size_t n : {0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099, (1 << 19) + 5, (3 << 18) + 16}) {
    std::vector<uint8_t> b(n);
    for (auto& x : b) x = uint8_t(rng());
    uint64_t want = slow_checksum(b);
    CHECK(finalize(sum_range(b.data(), n, 0), n) == want);
    CHECK(checksum_bytes(b.data(), n, TestThreads{}) == want);
    // Any 8-byte-aligned split, in any order, sums to the same value.
    for (size_t cut : {size_t(0), n / 16 * 8, n / 8 * 8}) {
      uint64_t s = sum_range(b.data() + cut, n - cut, cut / 8) + sum_range(b.data(), cut, 0);
      CHECK(finalize(s, n) == want);
    }
    // The fused copy copies exactly and sums the same terms, at unaligned addresses too.
    for (size_t shift : {0, 3}) {
      std::vector<uint8_t> src(n + shift + 8, 0xEE), dst(n + shift + 8, 0xA5);
      std::copy(b.begin(), b.end(), src.begin() + shift);
      uint64_t s = copy_sum_range(dst.data() + shift, src.data() + shift, n, 0);
      CHECK(finalize(s, n) == want);
      CHECK(std::equal(b.begin(), b.end(), dst.begin() + shift));
      for (size_t k = 0; k < shift; ++k) CHECK(dst[k] == 0xA5);
      for (size_t k = n + shift; k < dst.size(); ++k) CHECK(dst[k] == 0xA5);
    }
  }
  // Every single-bit flip gives a distinct checksum.
  std::vector<uint8_t> b(40);
  for (auto& x : b) x = uint8_t(rng());
  std::set<uint64_t> seen{slow_checksum(b)};
  for (size_t i = 0; i < b.size() * 8; ++i) {
    b[i / 8] ^= uint8_t(1u << (i % 8));
    seen.insert(finalize(sum_range(b.data(), b.size(), 0), b.size()));
    b[i / 8] ^= uint8_t(1u << (i % 8));
  }
  CHECK(seen.size() == 1 + b.size() * 8);
  std::puts("test_checksum: ok");
  return 0;
}
