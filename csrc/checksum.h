// The StrataCache checksum (checksum64), shared by the CPU and CUDA kernels.
//
// Definition, for a byte string b[0..n):
//   w_i  = little-endian 64-bit word i, i = 0 .. ceil(n/8)-1 (the last word
//          zero-padded when n is not a multiple of 8)
//   S    = sum over i of mix64(w_i ^ ((i + 1) * kPosition))      (mod 2^64)
//   h    = mix64(S ^ mix64(n + kLength))
// mix64 is a bijection, so any change confined to one word (every single-bit
// flip) changes S; the position key makes a swap of two different words
// change it too. Because S is a plain sum of per-word terms that only depend
// on the word and its index, a stream split into 8-byte-aligned pieces (pages,
// layers, threads, CUDA warps) is summed piecewise in any order, so the copy
// kernels fold the checksum into the copy loop at no extra pass over memory.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define STRATA_HD __host__ __device__ __forceinline__
#else
#define STRATA_HD inline
#endif

// The CPU word loops are written so GCC vectorizes them (the mix is two
// 64-bit multiplies per word: AVX-512DQ has them as one instruction);
// target_clones picks the widest variant the CPU supports at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(STRATACACHE_NO_CLONES) && \
    !defined(__CUDACC__)
#define STRATA_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define STRATA_CLONES
#endif

namespace stratacache::checksum {

constexpr uint64_t kPosition = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio
constexpr uint64_t kLength = 0xD6E8FEB86659FD93ull;

// Stafford's "Mix13" 64-bit finalizer: a bijection with full avalanche.
STRATA_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

// The term of word `w` at word index `i` of the stream.
STRATA_HD uint64_t word_term(uint64_t w, uint64_t i) { return mix64(w ^ ((i + 1) * kPosition)); }

// Final value of a stream of `nbytes` bytes whose word terms sum to `sum`.
STRATA_HD uint64_t finalize(uint64_t sum, uint64_t nbytes) { return mix64(sum ^ mix64(nbytes + kLength)); }

// Number of chunk_bytes-long chunks (the last one shorter) covering nbytes;
// written so that no chunk_bytes up to INT64_MAX overflows.
STRATA_HD int64_t chunk_count(int64_t nbytes, int64_t chunk_bytes) {
  return nbytes <= 0 ? 0 : (nbytes - 1) / chunk_bytes + 1;
}

// Zero-padded little-endian load of the last `nbytes` (< 8) bytes.
inline uint64_t load_tail(const uint8_t* p, size_t nbytes) {
  uint64_t w = 0;
  std::memcpy(&w, p, nbytes);  // little-endian hosts only (x86-64, aarch64)
  return w;
}

// Sum of the word terms of `nbytes` bytes at `p`, the first of which is word
// `first_word` of the stream (p must start on a word boundary of the stream;
// only the stream's last piece may have nbytes % 8 != 0).
uint64_t sum_range(const uint8_t* p, size_t nbytes, uint64_t first_word);

// memcpy(dst, src, nbytes) that also returns sum_range(src, nbytes, first_word),
// reading each source byte once.
uint64_t copy_sum_range(uint8_t* dst, const uint8_t* src, size_t nbytes, uint64_t first_word);

// Pieces a parallel checksum splits a range into (a multiple of 8 bytes).
constexpr size_t kPieceBytes = size_t{1} << 18;
// Pieces per thread: below 16 pieces (4 MiB) waking a second thread costs more
// than it saves on a busy host (measured: 1 MiB took 7.5 ms on 2 threads under
// load vs 0.66 ms on one).
constexpr int64_t kPiecesPerThread = 16;

// checksum64 of one contiguous byte range; `parallel_for(begin, end, grain,
// fn(b, e))` runs the pieces (e.g. at::parallel_for).
template <class ParallelFor>
uint64_t checksum_bytes(const uint8_t* p, size_t nbytes, ParallelFor&& parallel_for) {
  const int64_t npieces = static_cast<int64_t>((nbytes + kPieceBytes - 1) / kPieceBytes);
  if (npieces <= 1) return finalize(sum_range(p, nbytes, 0), nbytes);
  std::vector<uint64_t> sums(npieces, 0);
  parallel_for(int64_t{0}, npieces, kPiecesPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const size_t off = static_cast<size_t>(k) * kPieceBytes;
      sums[k] = sum_range(p + off, std::min(kPieceBytes, nbytes - off), off / 8);
    }
  });
  uint64_t sum = 0;
  for (uint64_t s : sums) sum += s;
  return finalize(sum, nbytes);
}

}  // namespace stratacache::checksum
