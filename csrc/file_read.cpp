// pread loop of the disk tier's verified reads (file_read.h).
#include "file_read.h"

#include <unistd.h>

#include <cerrno>

namespace stratacache::file_read {

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

}  // namespace stratacache::file_read
