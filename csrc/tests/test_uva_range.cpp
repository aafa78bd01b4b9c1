// C++ test of the UVA range check (issue 23, item 3): a host range is read by a
// kernel through UVA only when its first and last bytes are page-locked and map
// to one contiguous device range. A fake page-lock table stands in for CUDA: the
// CPU arena pinned in pieces that stop at the first failure, so an object can
// straddle a pinned and an unpinned piece.
#include <cstdint>
#include <vector>

#include "check.h"
#include "kv_transfer.h"

using namespace stratacache;

namespace {

struct Registration {
  const uint8_t* host;
  int64_t bytes;
  uintptr_t device;  // device address of host[0]
};

// cudaPointerGetAttributes over a list of registrations: one byte's device address, or null.
struct FakeUva {
  std::vector<Registration> regs;
  uint8_t* operator()(const void* p) const {
    auto* b = static_cast<const uint8_t*>(p);
    for (const auto& r : regs)
      if (b >= r.host && b < r.host + r.bytes) return reinterpret_cast<uint8_t*>(r.device + (b - r.host));
    return nullptr;
  }
};

}  // namespace

int main() {
  std::vector<uint8_t> arena(1 << 20);
  const uint8_t* base = arena.data();
  const int64_t piece = 256 << 10;
  // Pieces 0 and 1 pinned (device-contiguous), piece 2 failed to pin, piece 3 pinned elsewhere.
  FakeUva uva{{{base, piece, 0x10000000}, {base + piece, piece, 0x10000000 + piece},
               {base + 3 * piece, piece, 0x70000000}}};
  auto dev = [&](int64_t off, int64_t n) { return uva_range_of(base + off, n, uva); };

  CHECK(dev(100, 1000) == reinterpret_cast<uint8_t*>(0x10000000 + 100));          // inside piece 0
  CHECK(dev(piece - 10, 20) == reinterpret_cast<uint8_t*>(0x10000000 + piece - 10));  // 0 -> 1, contiguous
  CHECK(dev(2 * piece - 10, 20) == nullptr);       // last byte in the unpinned piece: stage
  CHECK(dev(2 * piece + 5, 100) == nullptr);       // wholly unpinned
  CHECK(dev(2 * piece + 5, piece) == nullptr);     // first byte unpinned, last byte pinned elsewhere
  CHECK(dev(piece, 3 * piece) == nullptr);         // spans the gap into a registration elsewhere
  CHECK(dev(3 * piece, piece) == reinterpret_cast<uint8_t*>(0x70000000));          // all of piece 3
  CHECK(dev(3 * piece + 7, 1) == reinterpret_cast<uint8_t*>(0x70000000 + 7));      // one byte
  CHECK(dev(5, 0) == reinterpret_cast<uint8_t*>(0x10000000 + 5));                  // empty range
  std::printf("test_uva_range: ok\n");
  return 0;
}
