// pread and write loops of the disk tier's record files (record_file.h).
#include "record_file.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

namespace stratacache::record_file {

int64_t pread_full(int fd, uint8_t* dst, size_t nbytes, uint64_t offset) {
  size_t done = 0;
  while (done < nbytes) {
    const ssize_t n = ::pread(fd, dst + done, nbytes - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -static_cast<int64_t>(errno);
    }
    if (n == 0) break;  // end of file
    done += static_cast<size_t>(n);
  }
  return static_cast<int64_t>(done);
}

int write_record(const char* tmp, const char* final_path, const uint8_t* head, size_t head_len,
                 const uint8_t* payload, size_t nbytes, int dir_fd) {
  const int fd = ::openat(dir_fd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return errno;
  struct iovec iov[2] = {{const_cast<uint8_t*>(head), head_len}, {const_cast<uint8_t*>(payload), nbytes}};
  int first = 0, err = 0;
  while (first < 2) {
    const ssize_t n = ::writev(fd, iov + first, 2 - first);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    if (n == 0 && iov[first].iov_len + (first == 0 ? iov[1].iov_len : 0) > 0) {
      err = EIO;  // no progress on a regular file
      break;
    }
    size_t left = static_cast<size_t>(n);  // advance past what was written
    while (first < 2 && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (first < 2) {
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && ::renameat(dir_fd, tmp, dir_fd, final_path) != 0) err = errno;
  if (err != 0) ::unlinkat(dir_fd, tmp, 0);
  return err;
}

}  // namespace stratacache::record_file
