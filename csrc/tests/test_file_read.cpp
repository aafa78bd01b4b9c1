// C++ tests of the disk tier's verified read (run under ASan/UBSan by ctest).
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "file_read.h"

using namespace stratacache;

int main() {
  char path[] = "/tmp/stratacache-test-file-read-XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0);
  std::mt19937_64 rng(7);
  const size_t head = 37;  // payloads start after a header, at any offset
  std::vector<uint8_t> file(head + (5u << 18) + 11);
  for (auto& x : file) x = uint8_t(rng());
  CHECK(::write(fd, file.data(), file.size()) == static_cast<ssize_t>(file.size()));

  for (size_t n : {size_t(0), size_t(1), size_t(4099), checksum::kPieceBytes, (size_t(5) << 18) + 11}) {
    std::vector<uint8_t> dst(n + 16, 0xA5);
    auto r = file_read::read_and_checksum(fd, head, dst.data(), n, TestThreads{});
    CHECK(r.error == 0);
    CHECK(r.bytes_read == n);
    CHECK(r.checksum == checksum::checksum_bytes(file.data() + head, n, TestThreads{}));
    CHECK(std::equal(dst.begin(), dst.begin() + n, file.begin() + head));
    for (size_t i = n; i < dst.size(); ++i) CHECK(dst[i] == 0xA5);  // nothing written past n
  }
  // A file shorter than the payload it claims: bytes_read says how much there was.
  {
    const size_t want = file.size() - head + 1000;
    std::vector<uint8_t> dst(want);
    auto r = file_read::read_and_checksum(fd, head, dst.data(), want, TestThreads{});
    CHECK(r.error == 0);
    CHECK(r.bytes_read < want);
  }
  // A bad descriptor is an errno, not a crash.
  {
    std::vector<uint8_t> dst(1 << 20);
    auto r = file_read::read_and_checksum(-1, 0, dst.data(), dst.size(), TestThreads{});
    CHECK(r.error == EBADF);
  }
  ::close(fd);
  ::unlink(path);
  return 0;
}
