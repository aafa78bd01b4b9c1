// Verified payload reads for the disk tier: read a byte range of a file and
// compute its checksum64 in the same pass.
//
// The range is read in pieces of checksum::kPieceBytes with pread(2); each
// piece is summed right after it lands, while it is still in cache, so the
// checksum costs no second pass over memory. Pieces run in parallel (pread has
// no shared file offset), which also spreads the kernel's page-cache copy over
// cores: a verified read can outrun a plain single-threaded read().
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "checksum.h"

namespace stratacache::file_read {

// Pieces per thread: two pieces (512 KiB) already amortize waking a thread.
constexpr int64_t kPiecesPerThread = 2;

struct ReadResult {
  uint64_t checksum = 0;  // checksum64 of the nbytes requested (valid only if complete)
  size_t bytes_read = 0;  // < nbytes: the file ended early (truncated)
  int error = 0;          // errno of the first failed pread, 0 if none
};

// pread exactly `nbytes` at `offset` into `dst` (retrying short reads and
// EINTR). Returns the bytes read (fewer at end of file), or -errno.
int64_t pread_full(int fd, uint8_t* dst, size_t nbytes, uint64_t offset);

// Reads `nbytes` at `offset` of `fd` into `dst` and checksums them;
// `parallel_for(begin, end, grain, fn(b, e))` runs the pieces.
template <class ParallelFor>
ReadResult read_and_checksum(int fd, uint64_t offset, uint8_t* dst, size_t nbytes,
                             ParallelFor&& parallel_for) {
  constexpr size_t piece = checksum::kPieceBytes;
  const int64_t npieces = static_cast<int64_t>((nbytes + piece - 1) / piece);
  std::vector<uint64_t> sums(static_cast<size_t>(npieces), 0);
  std::vector<size_t> got(static_cast<size_t>(npieces), 0);
  std::atomic<int> error{0};
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end && error.load(std::memory_order_relaxed) == 0; ++k) {
      const size_t off = static_cast<size_t>(k) * piece;
      const size_t len = std::min(piece, nbytes - off);
      const int64_t n = pread_full(fd, dst + off, len, offset + off);
      if (n < 0) {
        int expected = 0;
        error.compare_exchange_strong(expected, static_cast<int>(-n));
        return;
      }
      got[k] = static_cast<size_t>(n);
      if (static_cast<size_t>(n) < len) return;  // truncated: the caller sees bytes_read
      sums[k] = checksum::sum_range(dst + off, len, off / 8);
    }
  };
  if (npieces <= kPiecesPerThread) {
    run(0, npieces);
  } else {
    parallel_for(int64_t{0}, npieces, kPiecesPerThread, run);
  }
  ReadResult result;
  result.error = error.load();
  uint64_t sum = 0;
  for (int64_t k = 0; k < npieces; ++k) {
    result.bytes_read += got[k];
    if (got[k] < std::min(piece, nbytes - static_cast<size_t>(k) * piece)) break;
    sum += sums[k];
  }
  result.checksum = checksum::finalize(sum, nbytes);
  return result;
}

}  // namespace stratacache::file_read
