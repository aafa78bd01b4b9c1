// The disk tier's record files (a header, then the payload), read and written
// in one native call each so a small object costs a few system calls, not a
// Python file object.
//
// Reads verify: the payload range is read in pieces of checksum::kPieceBytes with pread(2); each
// piece is summed right after it lands, while it is still in cache, so the
// checksum costs no second pass over memory. Pieces run in parallel (pread has
// no shared file offset), which also spreads the kernel's page-cache copy over
// cores: a verified read can outrun a plain single-threaded read().
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checksum.h"

namespace stratacache::record_file {

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

// A whole stored record: header bytes, then the payload.
enum class RecordStatus : int {
  kOk = 0,
  kOpenFailed = 1,  // error holds errno (ENOENT: the file is gone)
  kBadHeader = 2,   // the header bytes differ from the expected ones
  kBadSize = 3,     // the file's size is not header + payload
  kReadFailed = 4,  // error holds errno of the payload read
};

struct RecordRead {
  RecordStatus status = RecordStatus::kOk;
  int error = 0;
  ReadResult payload;  // valid when status is kOk
};

// Opens `path` (relative to the directory `dir_fd`; a symbolic link is not
// followed: ELOOP), checks that it starts with `head` (head_len bytes) and is
// exactly head_len + nbytes long, then reads and checksums the payload into
// `dst` with read_and_checksum. One call per record, so the disk tier's
// per-object cost is a few system calls, not a Python file object.
template <class ParallelFor>
RecordRead read_record(const char* path, const uint8_t* head, size_t head_len, uint8_t* dst, size_t nbytes,
                       ParallelFor&& parallel_for, int dir_fd = AT_FDCWD) {
  RecordRead r;
  const int fd = ::openat(dir_fd, path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    r.status = RecordStatus::kOpenFailed;
    r.error = errno;
    return r;
  }
  std::vector<uint8_t> got(head_len);
  struct stat st {};
  const int64_t n = pread_full(fd, got.data(), head_len, 0);
  if (n < 0) {
    r.status = RecordStatus::kReadFailed;
    r.error = static_cast<int>(-n);
  } else if (static_cast<size_t>(n) != head_len || (head_len && std::memcmp(got.data(), head, head_len) != 0)) {
    r.status = RecordStatus::kBadHeader;
  } else if (::fstat(fd, &st) != 0) {
    r.status = RecordStatus::kReadFailed;
    r.error = errno;
  } else if (static_cast<uint64_t>(st.st_size) != head_len + nbytes) {
    r.status = RecordStatus::kBadSize;
  } else {
    r.payload = read_and_checksum(fd, head_len, dst, nbytes, parallel_for);
    if (r.payload.error) {
      r.status = RecordStatus::kReadFailed;
      r.error = r.payload.error;
    }
  }
  ::close(fd);
  return r;
}

// Writes `head` then `payload` to a new file `tmp` (created 0600, failing if
// it exists, even as a symbolic link) and renames it to `final`, so `final` is
// never seen half-written. Both names are relative to the directory `dir_fd`.
// Returns 0 or the errno of the failed step; on failure `tmp` is removed.
int write_record(const char* tmp, const char* final_path, const uint8_t* head, size_t head_len,
                 const uint8_t* payload, size_t nbytes, int dir_fd = AT_FDCWD);

}  // namespace stratacache::record_file
