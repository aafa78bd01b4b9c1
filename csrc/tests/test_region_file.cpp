// C++ tests of RegionFile (creation, validation and the attach protocol), run
// under ASan/UBSan by ctest: files created 0600 whatever the umask, every byte
// reserved at creation and re-reserved when holes appear, bad options and
// unsafe files refused with errors naming them, how a process came to the
// region (created / alone / joined), layout versions (older re-created when
// alone, refused when joined; newer always refused), settings mismatches.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "region_file.h"

using namespace stratacache;
using Attached = RegionFile::Attached;

static std::string region_path(const char* what) {
  return "/dev/shm/sc-regionfile-cpptest-" + std::to_string(getpid()) + "-" + what + ".region";
}

static RegionOptions options(const std::string& path) {
  RegionOptions o;
  o.path = path;
  o.capacity = 1 << 20;
  o.max_objects = 32;
  o.max_key_bytes = 64;
  o.block_bytes = 4096;
  return o;
}

// Attaches and returns how (the file stays attached while `keep` lives).
static Attached attach(RegionFile& f) {
  Attached how = Attached::kJoined;
  bool called = false;
  f.attach([&](Attached a) {
    how = a;
    called = true;
  });
  CHECK(called);
  return how;
}

template <class E, class Fn>
static std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  }
  return "";
}

static void write_u32(const std::string& path, off_t at, uint32_t v) {
  int fd = open(path.c_str(), O_RDWR);
  CHECK(fd >= 0 && pwrite(fd, &v, 4, at) == 4);
  close(fd);
}

// Makes the region's header a genuine one of the previous layout: version
// kLayoutVersion - 1 with its geometry checksum recomputed.
static void write_older_layout(const std::string& path) {
  RegionHeader h;
  int fd = open(path.c_str(), O_RDWR);
  CHECK(fd >= 0 && pread(fd, &h, sizeof h, 0) == ssize_t(sizeof h));
  h.layout_version = kLayoutVersion - 1;
  h.geometry_sum = RegionFile::geometry_checksum(h);
  CHECK(pwrite(fd, &h, sizeof h, 0) == ssize_t(sizeof h));
  close(fd);
}

static void test_creation_mode_and_backing() {
  const std::string path = region_path("create");
  unlink(path.c_str());
  const mode_t old_umask = umask(0);  // the umask must not widen the mode...
  {
    RegionFile f(options(path));
    CHECK(attach(f) == Attached::kCreated);
    struct stat st;
    CHECK(stat(path.c_str(), &st) == 0 && (st.st_mode & 0777) == 0600);
    const RegionHeader* h = f.header();
    CHECK(memcmp(h->magic, kRegionMagic, 8) == 0 && h->layout_version == kLayoutVersion);
    CHECK(uint64_t(st.st_size) == h->total_bytes && uint64_t(st.st_blocks) * 512 >= h->total_bytes);
    CHECK(f.data() == f.base() + h->data_off && h->capacity == (1u << 20));
    CHECK(h->geometry_sum == RegionFile::geometry_checksum(*h));
  }
  umask(0077);  // ...nor narrow a group mode
  const std::string group_path = region_path("group");
  unlink(group_path.c_str());
  {
    auto o = options(group_path);
    o.file_mode = 0660;
    RegionFile f(o);
    attach(f);
    struct stat st;
    CHECK(stat(group_path.c_str(), &st) == 0 && (st.st_mode & 0777) == 0660);
  }
  umask(old_umask);
  unlink(group_path.c_str());
  // A hole punched into the file is re-reserved by the next read-write attach.
  {
    int fd = open(path.c_str(), O_RDWR);
    CHECK(fd >= 0 && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 << 16, 1 << 16) == 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    const uint64_t size = uint64_t(st.st_size);
    CHECK(uint64_t(st.st_blocks) * 512 < size);
    close(fd);
    auto ro = options(path);
    ro.read_only = true;
    const std::string what = error_of<RegionError>([&] {
      RegionFile f(ro);
      f.attach([](Attached) { CHECK(false); });
    });
    CHECK(what.find(path) != std::string::npos && what.find("allocated") != std::string::npos);
    RegionFile f(options(path));
    CHECK(attach(f) == Attached::kAlone);
    CHECK(stat(path.c_str(), &st) == 0 && uint64_t(st.st_blocks) * 512 >= size);
  }
  unlink(path.c_str());
}

static void test_bad_options_and_unsafe_files() {
  const std::string path = region_path("options");
  unlink(path.c_str());
  auto bad = [&](auto change, const char* names) {
    auto o = options(path);
    change(o);
    const std::string what = error_of<std::invalid_argument>([&] { RegionFile f(o); });
    if (what.find(names) == std::string::npos) std::fprintf(stderr, "expected '%s' in '%s'\n", names, what.c_str());
    CHECK(what.find(names) != std::string::npos);
  };
  bad([](RegionOptions& o) { o.path = ""; }, "path is empty");
  bad([](RegionOptions& o) { o.block_bytes = 1000; }, "block_bytes");
  bad([](RegionOptions& o) { o.capacity = 100; }, "smaller than one block");
  bad([](RegionOptions& o) { o.max_objects = 0; }, "max_objects");
  bad([](RegionOptions& o) { o.max_key_bytes = 70000; }, "max_key_bytes");
  bad([](RegionOptions& o) { o.file_mode = 0666; }, "world-accessible");
  bad([](RegionOptions& o) { o.file_mode = 01600; }, "file_mode");
  CHECK(access(path.c_str(), F_OK) != 0);  // nothing was created
  // A symbolic link is never followed.
  const std::string link = region_path("link");
  unlink(link.c_str());
  CHECK(symlink(path.c_str(), link.c_str()) == 0);
  std::string what = error_of<RegionError>([&] { RegionFile f(options(link)); });
  CHECK(what.find(link) != std::string::npos && what.find("symbolic link") != std::string::npos);
  unlink(link.c_str());
  // A file more permissive than file_mode is refused, naming its mode.
  {
    RegionFile f(options(path));
    attach(f);
  }
  chmod(path.c_str(), 0640);
  what = error_of<RegionError>([&] { RegionFile f(options(path)); });
  CHECK(what.find(path) != std::string::npos && what.find("mode 0640") != std::string::npos);
  unlink(path.c_str());
  what = error_of<RegionError>([&] {
    auto o = options(path);
    o.read_only = true;
    RegionFile f(o);
  });
  CHECK(what.find("no region exists there") != std::string::npos);
}

static void test_attach_kinds_and_versions() {
  const std::string path = region_path("versions");
  unlink(path.c_str());
  {
    RegionFile first(options(path));
    CHECK(attach(first) == Attached::kCreated);
    {
      RegionFile second(options(path));
      CHECK(attach(second) == Attached::kJoined);
    }
    // Settings other than the region's are refused while it is in use.
    auto other = options(path);
    other.max_objects = 33;
    std::string what = error_of<RegionError>([&] {
      RegionFile f(other);
      attach(f);
    });
    CHECK(what.find("max_objects=32") != std::string::npos && what.find("max_objects=33") != std::string::npos);
    // An older layout is refused while another process is attached...
    write_older_layout(path);
    what = error_of<RegionError>([&] {
      RegionFile f(options(path));
      attach(f);
    });
    CHECK(what.find("layout version " + std::to_string(kLayoutVersion - 1) + " but this build uses version " +
                    std::to_string(kLayoutVersion)) != std::string::npos);
  }
  {  // ...and re-created by a process that attaches alone.
    RegionFile f(options(path));
    CHECK(attach(f) == Attached::kCreated && f.header()->layout_version == kLayoutVersion);
  }
  // A version field that a flipped bit made older (its checksum does not
  // match) is refused even when alone, never wiped as an old region.
  for (uint32_t version : {kLayoutVersion ^ 1u, kLayoutVersion ^ 2u}) {
    write_u32(path, 8, version);
    const std::string err = error_of<RegionError>([&] {
      RegionFile f(options(path));
      attach(f);
    });
    CHECK(err.find("layout version " + std::to_string(version) + " but this build uses") != std::string::npos);
    write_u32(path, 8, kLayoutVersion);
  }
  {
    RegionFile f(options(path));
    CHECK(attach(f) == Attached::kAlone);  // the restored header: attached, not re-created
  }
  // A newer layout is always refused (an older build never destroys it).
  write_u32(path, 8, kLayoutVersion + 1);
  std::string what = error_of<RegionError>([&] {
    RegionFile f(options(path));
    attach(f);
  });
  CHECK(what.find(path) != std::string::npos &&
        what.find("layout version " + std::to_string(kLayoutVersion + 1)) != std::string::npos);
  auto ro = options(path);
  ro.read_only = true;
  what = error_of<RegionError>([&] {
    RegionFile f(ro);
    f.attach([](Attached) { CHECK(false); });
  });
  CHECK(what.find("layout version " + std::to_string(kLayoutVersion + 1)) != std::string::npos);
  // reset re-creates it.
  auto reset = options(path);
  reset.reset = true;
  {
    RegionFile f(reset);
    CHECK(attach(f) == Attached::kCreated);
  }
  // Bad magic: named, and not overwritten without reset.
  int fd = open(path.c_str(), O_RDWR);
  CHECK(fd >= 0 && pwrite(fd, "NOTAREGN", 8, 0) == 8);
  close(fd);
  what = error_of<RegionError>([&] {
    RegionFile f(options(path));
    attach(f);
  });
  CHECK(what.find("bad magic") != std::string::npos);
  unlink(path.c_str());
}

int main() {
  test_creation_mode_and_backing();
  test_bad_options_and_unsafe_files();
  test_attach_kinds_and_versions();
  std::printf("test_region_file: all passed\n");
  return 0;
}
