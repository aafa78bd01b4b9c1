// C++ tests of the CPU KV copy kernels (run under ASan/UBSan by ctest):
// randomized block transfers against a direct restatement, with
// poisoned destinations and guard bytes around every buffer.
#include <random>
#include <vector>

#include "check.h"
#include "kv_transfer.h"

using namespace stratacache;

constexpr uint8_t kPoison = 0xA5;

static uint64_t checksum_of(const uint8_t* p, size_t n) {
  return checksum::finalize(checksum::sum_range(p, n, 0), n);
}

static void block_case(std::mt19937_64& rng, int64_t L, int64_t nb, int64_t P, int64_t stride_pad, int64_t n,
                       int64_t cb) {
  // One buffer, layers interleaved per block like [B, L, P + pad] with a guard at the end.
  const int64_t stride = L * (P + stride_pad);
  std::vector<uint8_t> kv(nb * stride + 64);
  for (auto& x : kv) x = uint8_t(rng());
  BlockPlan p;
  p.n_blocks = n;
  p.n_layers = L;
  p.page_bytes = P;
  p.chunk_blocks = cb;
  p.n_chunks = cb ? (n + cb - 1) / cb : 0;
  p.num_blocks = nb;
  for (int64_t l = 0; l < L; ++l) {
    p.layer_base.push_back(kv.data() + l * (P + stride_pad));
    p.layer_block_stride.push_back(stride);
  }
  std::vector<int64_t> ids(n);
  for (auto& id : ids) id = int64_t(rng() % nb);
  std::vector<uint8_t> flat(n * L * P + 32, kPoison);
  bool sums = cb > 0 && P % 8 == 0;
  auto got = copy_pages(p, ids.data(), flat.data(), Direction::kGather, sums, TestThreads{});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < L; ++l)
      CHECK(std::equal(flat.begin() + (i * L + l) * P, flat.begin() + (i * L + l + 1) * P,
                       kv.begin() + ids[i] * stride + l * (P + stride_pad)));
  for (size_t k = n * L * P; k < flat.size(); ++k) CHECK(flat[k] == kPoison);
  if (sums) {
    auto pass = chunk_checksums_of(p, flat.data(), TestThreads{});
    for (int64_t c = 0; c < p.n_chunks; ++c) {
      CHECK(checksum::finalize(got[c], p.chunk_len(c)) == pass[c]);
      CHECK(pass[c] == checksum_of(flat.data() + c * p.chunk_bytes(), p.chunk_len(c)));
    }
  }
  // Scatter into a poisoned copy: exactly the named pages change.
  std::vector<uint8_t> back(kv.size(), kPoison);
  for (int64_t l = 0; l < L; ++l) p.layer_base[l] = back.data() + l * (P + stride_pad);
  std::vector<int64_t> uniq(ids);  // scatter needs distinct ids for a defined result
  for (int64_t i = 0; i < n; ++i) uniq[i] = i % nb;
  copy_pages(p, uniq.data(), flat.data(), Direction::kScatter, sums, TestThreads{});
  std::vector<uint8_t> want(kv.size(), kPoison);
  for (int64_t i = 0; i < std::min(n, nb); ++i)
    for (int64_t l = 0; l < L; ++l)
      std::copy(flat.begin() + (i * L + l) * P, flat.begin() + (i * L + l + 1) * P,
                want.begin() + uniq[i] * stride + l * (P + stride_pad));
  if (n <= nb) CHECK(back == want);
}

// A layer slice [:, l0:l0+L] of a [n, Ltot, P] payload (rows Ltot * P apart), as layer-wise loads copy it.
static void layer_slice_case(std::mt19937_64& rng, int64_t Ltot, int64_t l0, int64_t L, int64_t nb, int64_t P,
                             int64_t n) {
  const int64_t row = Ltot * P;
  std::vector<uint8_t> payload(n * row + 32);
  for (auto& x : payload) x = uint8_t(rng());
  std::vector<uint8_t> kv(L * nb * P + 64, kPoison);
  BlockPlan p;
  p.n_blocks = n;
  p.n_layers = L;
  p.page_bytes = P;
  p.num_blocks = nb;
  p.flat_row_bytes = row;
  for (int64_t l = 0; l < L; ++l) {
    p.layer_base.push_back(kv.data() + l * nb * P);
    p.layer_block_stride.push_back(P);
  }
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = (i * 7 + 3) % nb;  // distinct while n <= nb
  copy_pages(p, ids.data(), payload.data() + l0 * P, Direction::kScatter, false, TestThreads{});
  std::vector<uint8_t> want(kv.size(), kPoison);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < L; ++l)
      std::copy(payload.begin() + i * row + (l0 + l) * P, payload.begin() + i * row + (l0 + l + 1) * P,
                want.begin() + l * nb * P + ids[i] * P);
  CHECK(kv == want);
  // Gather the slice back into a poisoned payload: only the slice's pages are written.
  std::vector<uint8_t> back(payload.size(), kPoison);
  copy_pages(p, ids.data(), back.data() + l0 * P, Direction::kGather, false, TestThreads{});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < Ltot; ++l) {
      const bool in = l >= l0 && l < l0 + L;
      for (int64_t b = 0; b < P; ++b) {
        const size_t at = size_t(i * row + l * P + b);
        CHECK(back[at] == (in ? payload[at] : kPoison));
      }
    }
  for (size_t k = n * row; k < back.size(); ++k) CHECK(back[k] == kPoison);
}

// vector_copy and stream_copy: exact bytes and untouched neighbours at every alignment and length class.
static void vector_copy_cases(std::mt19937_64& rng) {
  for (size_t n : {0, 7, 4095, 4096, 4097, 4096 + 127, 4096 + 159, 65536, 65536 + 200}) {
    for (size_t dshift : {0, 1, 8, 31, 32, 33}) {
      for (size_t sshift : {0, 5}) {
        std::vector<uint8_t> src(n + 64), dst(n + 64, kPoison);
        for (auto& x : src) x = uint8_t(rng());
        for (auto copy : {vector_copy, stream_copy}) {
          std::fill(dst.begin(), dst.end(), kPoison);
          copy(dst.data() + dshift, src.data() + sshift, n);
          CHECK(std::equal(src.begin() + sshift, src.begin() + sshift + n, dst.begin() + dshift));
          for (size_t k = 0; k < dshift; ++k) CHECK(dst[k] == kPoison);
          for (size_t k = n + dshift; k < dst.size(); ++k) CHECK(dst[k] == kPoison);
        }
      }
    }
  }
}

int main() {
  std::mt19937_64 rng(7);
  vector_copy_cases(rng);
  block_case(rng, 4, 10, 256, 0, 9, 2);
  block_case(rng, 3, 5, 104, 8, 5, 3);
  block_case(rng, 1, 4, 13, 3, 4, 1);                       // unaligned pages: no fused sums
  block_case(rng, 2, 3, (1 << 18) + 4096, 0, 3, 2);         // segmented pages
  block_case(rng, 32, 6, 64, 0, 6, 4);
  block_case(rng, 3, 6, 4096 + 8 * 17, 8, 5, 0);           // vector copy with a tail, pages not 32-aligned
  block_case(rng, 2, 5, 40001, 3, 4, 0);                    // odd page size
  block_case(rng, 2, 4, 64, 0, 0, 2);                       // no blocks
  layer_slice_case(rng, 8, 0, 1, 12, 256, 10);
  layer_slice_case(rng, 8, 5, 3, 12, 104, 12);
  layer_slice_case(rng, 4, 3, 1, 5, 13, 5);                 // unaligned pages
  std::puts("test_kv_transfer: ok");
  return 0;
}
