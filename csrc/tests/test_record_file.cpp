// C++ tests of the disk tier's verified read (run under ASan/UBSan by ctest).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "record_file.h"

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
    auto r = record_file::read_and_checksum(fd, head, dst.data(), n, TestThreads{});
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
    auto r = record_file::read_and_checksum(fd, head, dst.data(), want, TestThreads{});
    CHECK(r.error == 0);
    CHECK(r.bytes_read < want);
  }
  // A bad descriptor is an errno, not a crash.
  {
    std::vector<uint8_t> dst(1 << 20);
    auto r = record_file::read_and_checksum(-1, 0, dst.data(), dst.size(), TestThreads{});
    CHECK(r.error == EBADF);
  }
  // Whole records: header checked, size checked, payload read and summed.
  {
    const size_t n = file.size() - head;
    std::vector<uint8_t> dst(n + 8, 0xA5);
    auto r = record_file::read_record(path, file.data(), head, dst.data(), n, TestThreads{});
    CHECK(r.status == record_file::RecordStatus::kOk);
    CHECK(r.payload.bytes_read == n);
    CHECK(r.payload.checksum == checksum::checksum_bytes(file.data() + head, n, TestThreads{}));
    CHECK(std::equal(dst.begin(), dst.begin() + n, file.begin() + head));
    CHECK(dst[n] == 0xA5);
    std::vector<uint8_t> other_head(file.begin(), file.begin() + head);
    other_head[head - 1] ^= 1;
    CHECK(record_file::read_record(path, other_head.data(), head, dst.data(), n, TestThreads{}).status ==
          record_file::RecordStatus::kBadHeader);
    CHECK(record_file::read_record(path, file.data(), head, dst.data(), n - 1, TestThreads{}).status ==
          record_file::RecordStatus::kBadSize);
    // A header longer than the file is a bad header, not an over-read.
    std::vector<uint8_t> long_head(file.size() + 5, 0);
    CHECK(record_file::read_record(path, long_head.data(), long_head.size(), dst.data(), 0, TestThreads{}).status ==
          record_file::RecordStatus::kBadHeader);
    auto gone = record_file::read_record("/nonexistent/stratacache", file.data(), head, dst.data(), n, TestThreads{});
    CHECK(gone.status == record_file::RecordStatus::kOpenFailed && gone.error == ENOENT);
  }
  // write_record: exact bytes, mode 0600, the temp file gone; an existing temp name fails cleanly.
  {
    const std::string final_path = std::string(path) + ".rec", tmp = final_path + ".tmp";
    const size_t n = (3u << 18) + 5;
    CHECK(record_file::write_record(tmp.c_str(), final_path.c_str(), file.data(), head, file.data() + head, n) == 0);
    CHECK(::access(tmp.c_str(), F_OK) != 0);
    struct stat st {};
    CHECK(::stat(final_path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    CHECK(static_cast<size_t>(st.st_size) == head + n);
    std::vector<uint8_t> dst(n);
    auto r = record_file::read_record(final_path.c_str(), file.data(), head, dst.data(), n, TestThreads{});
    CHECK(r.status == record_file::RecordStatus::kOk);
    CHECK(std::equal(dst.begin(), dst.end(), file.begin() + head));
    const int busy = ::open(tmp.c_str(), O_WRONLY | O_CREAT, 0600);  // another writer's temp file
    CHECK(busy >= 0);
    ::close(busy);
    CHECK(record_file::write_record(tmp.c_str(), final_path.c_str(), file.data(), 1, file.data(), 1) == EEXIST);
    CHECK(::stat(final_path.c_str(), &st) == 0 && static_cast<size_t>(st.st_size) == head + n);  // untouched
    ::unlink(final_path.c_str());
    ::unlink(tmp.c_str());
    // A failed rename removes the temp file it wrote.
    CHECK(record_file::write_record(tmp.c_str(), "/nonexistent/dir/x", file.data(), 1, file.data(), 1) == ENOENT);
    CHECK(::access(tmp.c_str(), F_OK) != 0);
  }
  ::close(fd);
  ::unlink(path);
  return 0;
}
