// CPU checksum64 kernels and the checksum64 / chunk_checksums ops.
#include "checksum.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kv_transfer.h"

namespace stratacache::checksum {

// The loops below are written so GCC vectorizes them (the mix is two 64-bit
// multiplies per word: AVX-512DQ has them as one instruction); target_clones
// picks the widest variant the CPU supports at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(STRATACACHE_NO_CLONES)
#define STRATA_CLONES __attribute__((target_clones("avx512dq", "avx2", "default")))
#else
#define STRATA_CLONES
#endif

STRATA_CLONES
static uint64_t sum_words(const uint64_t* __restrict w, size_t nwords, uint64_t first_word) {
  uint64_t sum = 0;
  for (size_t i = 0; i < nwords; ++i) sum += word_term(w[i], first_word + i);
  return sum;
}

STRATA_CLONES
static uint64_t copy_sum_words(uint64_t* __restrict dst, const uint64_t* __restrict src, size_t nwords,
                               uint64_t first_word) {
  uint64_t sum = 0;
  for (size_t i = 0; i < nwords; ++i) {
    uint64_t w = src[i];
    dst[i] = w;
    sum += word_term(w, first_word + i);
  }
  return sum;
}

// Word access through a may_alias type: pages are arbitrary tensor memory.
using aliased_u64 = uint64_t __attribute__((__may_alias__));

uint64_t sum_range(const uint8_t* p, size_t nbytes, uint64_t first_word) {
  size_t nwords = nbytes / 8;
  uint64_t sum = sum_words(reinterpret_cast<const aliased_u64*>(p), nwords, first_word);
  if (nbytes % 8) sum += word_term(load_tail(p + nwords * 8, nbytes % 8), first_word + nwords);
  return sum;
}

uint64_t copy_sum_range(uint8_t* dst, const uint8_t* src, size_t nbytes, uint64_t first_word) {
  size_t nwords = nbytes / 8;
  uint64_t sum;
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % alignof(uint64_t) == 0) {
    sum = copy_sum_words(reinterpret_cast<aliased_u64*>(dst), reinterpret_cast<const aliased_u64*>(src), nwords,
                         first_word);
  } else {  // byte-offset views: copy first, then sum the (now cache-hot) copy
    std::memcpy(dst, src, nwords * 8);
    sum = sum_range(dst, nwords * 8, first_word);
  }
  if (nbytes % 8) {
    size_t tail = nbytes % 8;
    std::memcpy(dst + nwords * 8, src + nwords * 8, tail);
    sum += word_term(load_tail(src + nwords * 8, tail), first_word + nwords);
  }
  return sum;
}

// Pieces a parallel checksum splits a range into (a multiple of 8 bytes).
constexpr size_t kPieceBytes = size_t{1} << 18;

uint64_t checksum_bytes(const uint8_t* p, size_t nbytes) {
  size_t npieces = (nbytes + kPieceBytes - 1) / kPieceBytes;
  if (npieces <= 1) return finalize(sum_range(p, nbytes, 0), nbytes);
  std::vector<uint64_t> sums(npieces, 0);
  at::parallel_for(0, static_cast<int64_t>(npieces), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      size_t off = static_cast<size_t>(k) * kPieceBytes;
      sums[k] = sum_range(p + off, std::min(kPieceBytes, nbytes - off), off / 8);
    }
  });
  uint64_t sum = 0;
  for (uint64_t s : sums) sum += s;
  return finalize(sum, nbytes);
}

}  // namespace stratacache::checksum

namespace stratacache {
namespace {

using checksum::checksum_bytes;

at::Tensor checksum64_cpu(const at::Tensor& data) {
  check_contiguous_bytes(data, "data");
  auto out = at::empty({}, data.options().dtype(at::kLong));
  out.fill_(static_cast<int64_t>(checksum_bytes(byte_ptr(data), data.nbytes())));
  return out;
}

at::Tensor chunk_checksums_cpu(const at::Tensor& data, int64_t chunk_bytes) {
  check_contiguous_bytes(data, "data");
  TORCH_CHECK(chunk_bytes > 0, "chunk_checksums: chunk_bytes must be positive, got ", chunk_bytes);
  int64_t nbytes = static_cast<int64_t>(data.nbytes());
  int64_t nchunks = (nbytes + chunk_bytes - 1) / chunk_bytes;
  auto out = at::empty({nchunks}, data.options().dtype(at::kLong));
  auto* res = out.data_ptr<int64_t>();
  const uint8_t* p = byte_ptr(data);
  if (nchunks == 0) return out;
  if (nchunks == 1 || chunk_bytes >= int64_t{1} << 22) {
    // Few big chunks: parallelize inside each chunk.
    for (int64_t c = 0; c < nchunks; ++c) {
      int64_t off = c * chunk_bytes;
      res[c] = static_cast<int64_t>(checksum_bytes(p + off, std::min(chunk_bytes, nbytes - off)));
    }
    return out;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t off = c * chunk_bytes;
      size_t len = static_cast<size_t>(std::min(chunk_bytes, nbytes - off));
      res[c] = static_cast<int64_t>(checksum::finalize(checksum::sum_range(p + off, len, 0), len));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stratacache, CPU, m) {
  m.impl("checksum64", &checksum64_cpu);
  m.impl("chunk_checksums", &chunk_checksums_cpu);
}

}  // namespace stratacache
