// The file behind a shared region and its attach protocol (see region_file.h).
#include "region_file.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include "hash_index.h"

namespace stratacache {
namespace {

std::string errno_text(int err) { return std::string(strerror(err)); }

std::string octal(uint32_t v) {
  char b[16];
  snprintf(b, sizeof b, "0%o", v);
  return b;
}

}  // namespace

RegionFile::RegionFile(const RegionOptions& opts) : opts_(opts) {
  check_options();
  open_file();
}

RegionFile::~RegionFile() {
  if (base_) munmap(base_, map_bytes_);
  if (fd_ >= 0) close(fd_);  // also drops our flock
}

void RegionFile::check_options() const {
  if (opts_.path.empty()) throw std::invalid_argument("shared region path is empty");
  if (opts_.read_only) return;  // the header says what the region is
  if (opts_.block_bytes < 64 || opts_.block_bytes > kMaxBlockBytes || (opts_.block_bytes & (opts_.block_bytes - 1)))
    throw std::invalid_argument("block_bytes must be a power of two in [64, 2^30], got " +
                                std::to_string(opts_.block_bytes));
  if (opts_.capacity < opts_.block_bytes)
    throw std::invalid_argument("capacity " + std::to_string(opts_.capacity) + " is smaller than one block (" +
                                std::to_string(opts_.block_bytes) + " bytes)");
  if (opts_.capacity > kMaxCapacity)
    throw std::invalid_argument("capacity " + std::to_string(opts_.capacity) + " exceeds 2^56 bytes");
  if (opts_.max_objects < 1 || opts_.max_objects > (1u << 30))
    throw std::invalid_argument("max_objects must be in [1, 2^30], got " + std::to_string(opts_.max_objects));
  if (opts_.max_key_bytes < 1 || opts_.max_key_bytes > 65536)
    throw std::invalid_argument("max_key_bytes must be in [1, 65536], got " + std::to_string(opts_.max_key_bytes));
  if (opts_.file_mode & ~0777u)
    throw std::invalid_argument("file_mode must be a permission mode like 0600, got " + octal(opts_.file_mode));
  if (opts_.file_mode & 0007)
    throw std::invalid_argument("file_mode " + octal(opts_.file_mode) +
                                " gives access to all users; a shared region must not be "
                                "world-accessible (use 0600, or 0660 for a group)");
}

// Checksum of the header's geometry (every field from layout_version to
// data_off), so a flipped bit there is caught even where the fields still
// agree with each other.
uint64_t RegionFile::geometry_checksum(const RegionHeader& h) {
  const char* begin = reinterpret_cast<const char*>(&h.layout_version);
  const char* end = reinterpret_cast<const char*>(&h.geometry_sum);
  return hash_key(std::string_view(begin, size_t(end - begin)));
}

// Every geometry field is checked against the others, against what this
// build derives from them, against the checksum and against the file size,
// before anything it describes is dereferenced.
std::string RegionFile::header_problem(const RegionHeader& h, uint64_t file_bytes) const {
  const std::string& p = opts_.path;
  const std::string fix = "; set reset (tiers.shared.reset) to recreate it, losing its contents";
  if (h.layout_version != kLayoutVersion)
    return p + " has shared-region layout version " + std::to_string(h.layout_version) +
           " but this build uses version " + std::to_string(kLayoutVersion) + fix;
  auto corrupt = [&](const char* field, uint64_t have, const std::string& want) {
    return p + " has a corrupt header: field " + field + " is " + std::to_string(have) + ", expected " +
           want + fix;
  };
  if (h.block_bytes < 64 || h.block_bytes > kMaxBlockBytes || (h.block_bytes & (h.block_bytes - 1)))
    return corrupt("block_bytes", h.block_bytes, "a power of two in [64, 2^30]");
  if (h.max_objects < 1 || h.max_objects > (1u << 30))
    return corrupt("max_objects", h.max_objects, "a value in [1, 2^30]");
  if (h.max_key_bytes < 1 || h.max_key_bytes > 65536)
    return corrupt("max_key_bytes", h.max_key_bytes, "a value in [1, 65536]");
  if (h.capacity < h.block_bytes || h.capacity > kMaxCapacity || h.capacity % h.block_bytes)
    return corrupt("capacity", h.capacity, "a multiple of block_bytes in [block_bytes, 2^56]");
  const RegionLayout l(h.capacity, h.max_objects, h.max_key_bytes, h.block_bytes);
  const std::pair<const char*, std::pair<uint64_t, uint64_t>> derived[] = {
      {"header_bytes", {h.header_bytes, kHeaderBytes}},
      {"units", {h.units, l.units}},
      {"bucket_count", {h.bucket_count, l.bucket_count}},
      {"entry_stride", {h.entry_stride, l.entry_stride}},
      {"aux_max", {h.aux_max, kAuxMax}},
      {"leases_per_entry", {h.leases_per_entry, kLeasesPerEntry}},
      {"mutex_bytes", {h.mutex_bytes, sizeof(pthread_mutex_t)}},
      {"buckets_off", {h.buckets_off, l.buckets_off}},
      {"entries_off", {h.entries_off, l.entries_off}},
      {"free_off", {h.free_off, l.free_off}},
      {"bitmap_off", {h.bitmap_off, l.bitmap_off}},
      {"data_off", {h.data_off, l.data_off}},
      {"total_bytes", {h.total_bytes, l.total}},
  };
  for (const auto& [field, values] : derived)
    if (values.first != values.second)
      return corrupt(field, values.first, std::to_string(values.second) + " (derived from capacity, "
                                          "max_objects, max_key_bytes and block_bytes)");
  if (h.geometry_sum != geometry_checksum(h))
    return p + " has a corrupt header: field geometry_sum does not match the header's geometry" + fix;
  if (file_bytes < h.total_bytes)
    return p + " is truncated (" + std::to_string(file_bytes) + " of " + std::to_string(h.total_bytes) +
           " bytes)" + fix;
  return "";
}

void RegionFile::open_file() {
  const std::string& p = opts_.path;
  const int flags = (opts_.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOFOLLOW;
  fd_ = open(p.c_str(), flags);
  if (fd_ < 0 && errno == ENOENT && !opts_.read_only) {
    fd_ = open(p.c_str(), flags | O_CREAT | O_EXCL, opts_.file_mode);
    if (fd_ >= 0) {
      if (fchmod(fd_, opts_.file_mode) != 0) {  // the umask must not widen or narrow it
        int err = errno;
        close(fd_);
        throw RegionError("cannot set mode of shared region " + p + ": " + errno_text(err));
      }
    } else if (errno == EEXIST) {
      fd_ = open(p.c_str(), flags);
    }
  }
  if (fd_ < 0) {
    int err = errno;
    std::string hint;
    if (err == EACCES || err == EPERM)
      hint = " (check the file's owner and mode; tiers.shared.file_mode sets the mode of new regions)";
    else if (err == ELOOP)
      hint = " (the path is a symbolic link; refusing to follow it)";
    else if (err == ENOENT)
      hint = opts_.read_only ? " (no region exists there)" : " (does the directory exist?)";
    throw RegionError("cannot open shared region " + p + ": " + errno_text(err) + hint);
  }
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    int err = errno;
    close(fd_);
    throw RegionError("cannot stat shared region " + p + ": " + errno_text(err));
  }
  is_device_ = S_ISCHR(st.st_mode);
  if (!is_device_ && !S_ISREG(st.st_mode)) {
    close(fd_);
    throw RegionError("shared region " + p + " is neither a regular file nor a DAX character device");
  }
  if (!is_device_ && !opts_.read_only) {
    unsigned mode = st.st_mode & 0777;
    char buf[256];
    if (mode & ~opts_.file_mode) {
      snprintf(buf, sizeof buf, " has mode 0%o, more permissive than file_mode 0%o; chmod it or remove it",
               mode, opts_.file_mode);
      close(fd_);
      throw RegionError("shared region " + p + buf);
    }
    if (st.st_uid != geteuid() && !(opts_.file_mode & 0070)) {
      snprintf(buf, sizeof buf,
               " is owned by uid %u, not by this user (uid %u); set file_mode to a group mode "
               "such as 0660 to share a region between users",
               unsigned(st.st_uid), unsigned(geteuid()));
      close(fd_);
      throw RegionError("shared region " + p + buf);
    }
  }
}

static uint64_t device_bytes(int fd, const std::string& path) {
  struct stat st;
  fstat(fd, &st);
  char sys[128];
  snprintf(sys, sizeof sys, "/sys/dev/char/%u:%u/size", major(st.st_rdev), minor(st.st_rdev));
  std::ifstream in(sys);
  uint64_t bytes = 0;
  if (!(in >> bytes) || bytes == 0)
    throw RegionError("shared region " + path + " is a character device but " + sys +
                      " does not give its size; only device-DAX devices (/dev/daxX.Y) are supported");
  return bytes;
}

void RegionFile::map_region(uint64_t bytes) {
  int prot = PROT_READ | (opts_.read_only ? 0 : PROT_WRITE);
  void* p = mmap(nullptr, bytes, prot, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED)
    throw RegionError("cannot map shared region " + opts_.path + " (" + std::to_string(bytes) +
                      " bytes): " + errno_text(errno));
  base_ = p;
  map_bytes_ = bytes;
  hdr_ = static_cast<RegionHeader*>(p);
}


void RegionFile::bind_numa() {
  if (opts_.numa_node < 0) return;
  const std::string& p = opts_.path;
  int node = opts_.numa_node;
  char sys[96];
  snprintf(sys, sizeof sys, "/sys/devices/system/node/node%d", node);
  if (node >= 1024 || access(sys, F_OK) != 0)
    throw RegionError("numa_node " + std::to_string(node) + " does not exist on this host (see " +
                      "/sys/devices/system/node) for shared region " + p);
  if (is_device_) return;  // a devdax mapping is the device's own memory already
  unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
  mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
  constexpr int kMpolBind = 2;
  constexpr unsigned kMpolMfMove = 1u << 1;
  long rc = syscall(SYS_mbind, base_, map_bytes_, kMpolBind, mask, 1024ul, kMpolMfMove);
  if (rc != 0)
    throw RegionError("mbind of shared region " + p + " to numa_node " + std::to_string(node) +
                      " failed: " + errno_text(errno));
}

// Reads the header with pread, so that a file too short for it (or a header
// that lies about the geometry) is never faulted on through the mapping.
bool RegionFile::read_header(RegionHeader* h) const {
  if (!is_device_) return pread(fd_, h, sizeof(RegionHeader), 0) == ssize_t(sizeof(RegionHeader));
  // Device DAX supports only mmap (in units of its alignment, up to 2 MiB).
  const size_t bytes = size_t(std::min<uint64_t>(device_bytes(fd_, opts_.path), 2ull << 20));
  void* m = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd_, 0);
  if (m == MAP_FAILED) return false;
  memcpy(static_cast<void*>(h), m, sizeof(RegionHeader));
  munmap(m, bytes);
  return true;
}

uint64_t RegionFile::file_bytes() const {
  if (is_device_) return device_bytes(fd_, opts_.path);
  struct stat st;
  if (fstat(fd_, &st) != 0)
    throw RegionError("cannot stat shared region " + opts_.path + ": " + errno_text(errno));
  return uint64_t(st.st_size);
}

// Free bytes of the filesystem holding the region, for error messages.
static std::string free_space_text(int fd) {
  struct statvfs vfs;
  if (fstatvfs(fd, &vfs) != 0) return "free space unknown";
  return std::to_string(uint64_t(vfs.f_bavail) * vfs.f_frsize) + " bytes free";
}

// Makes sure every byte of the first `total` is backed by the filesystem, so
// that no access through the mapping can fault with SIGBUS when the
// filesystem (a tmpfs such as /dev/shm) fills up. A file whose blocks already
// cover it costs one fstat; otherwise fallocate(2) fills its holes without
// changing data. Where the filesystem lacks fallocate, glibc's
// posix_fallocate writes a zero into every zero block, which is only safe
// while nobody else is attached (`alone`). Read-only attaches cannot
// reserve, so they refuse.
void RegionFile::ensure_backed(uint64_t total, bool alone) {
  if (is_device_) return;  // device DAX memory is the device itself
  const std::string& p = opts_.path;
  struct stat st;
  if (fstat(fd_, &st) != 0)
    throw RegionError("cannot stat shared region " + p + ": " + errno_text(errno));
  if (uint64_t(st.st_blocks) * 512 >= total) return;
  if (opts_.read_only)
    throw RegionError("shared region " + p + " has only " + std::to_string(uint64_t(st.st_blocks) * 512) +
                      " of its " + std::to_string(total) + " bytes allocated on its filesystem (" +
                      free_space_text(fd_) + "); reading it could fault. Attach it read-write once "
                      "(which reserves the space) or set reset (tiers.shared.reset)");
  int err = fallocate(fd_, 0, 0, off_t(total)) == 0 ? 0 : errno;
  if (err == EOPNOTSUPP && alone) err = posix_fallocate(fd_, 0, off_t(total));
  if (err != 0)
    throw RegionError("cannot reserve " + std::to_string(total) + " bytes for shared region " + p + ": " +
                      errno_text(err) + " (the filesystem has " + free_space_text(fd_) +
                      "); lower tiers.shared.capacity or free space there");
}

void RegionFile::attach(const std::function<void(Attached)>& ready) {
  const std::string& p = opts_.path;
  RegionHeader h;
  if (opts_.read_only) {
    // Inspection: validate the header, then map what it describes.
    const uint64_t avail = file_bytes();
    if (avail < kHeaderBytes || !read_header(&h))
      throw RegionError(p + " is too small to be a StrataCache shared region");
    if (memcmp(h.magic, kRegionMagic, 8) != 0)
      throw RegionError(p + " is not an initialised StrataCache shared region (bad magic)");
    std::string problem = header_problem(h, avail);
    if (!problem.empty()) throw RegionError(problem);
    ensure_backed(h.total_bytes, false);
    map_region(h.total_bytes);
    data_ = base() + hdr_->data_off;
    return;
  }

  const RegionLayout l(opts_.capacity, opts_.max_objects, opts_.max_key_bytes, opts_.block_bytes);
  static const char zeros[8] = {};
  for (int attempt = 0;; ++attempt) {
    if (attempt > 2000)
      throw RegionError("shared region " + p + " stays uninitialised (a process died while creating it?); "
                        "stop its users or set reset");
    const uint64_t avail = file_bytes();
    if (is_device_ && avail < l.total)
      throw RegionError("DAX device " + p + " has " + std::to_string(avail) + " bytes but capacity " +
                        std::to_string(opts_.capacity) + " with max_objects " +
                        std::to_string(opts_.max_objects) + " needs " + std::to_string(l.total) +
                        "; lower tiers.shared.capacity");
    if (flock(fd_, LOCK_EX | LOCK_NB) == 0) {
      // We are the only process attached: create, re-create or recover the region.
      bool fresh = avail < kHeaderBytes || !read_header(&h) || memcmp(h.magic, zeros, 8) == 0;
      // A region of an older layout holds nothing this build can read and
      // nobody else is attached: start it over (its objects become misses).
      // Only a genuine one, whose geometry checksum (kept since layout 2)
      // matches: a flipped bit in the version field is refused below as a
      // version mismatch, never taken for an old region and wiped. A newer
      // layout is refused too, so an older build never destroys it.
      if (!fresh && memcmp(h.magic, kRegionMagic, 8) == 0 && h.layout_version >= 2 &&
          h.layout_version < kLayoutVersion && h.geometry_sum == geometry_checksum(h))
        fresh = true;
      if (!fresh) {
        std::string problem = region_problem(h, avail, l);
        if (!problem.empty()) {
          if (!opts_.reset) throw RegionError(problem);
          fresh = true;  // corrupt, truncated or incompatible: reset re-creates it
        }
      }
      if (fresh) {
        if (!is_device_) {
          if (ftruncate(fd_, 0) != 0 || ftruncate(fd_, off_t(l.total)) != 0)
            throw RegionError("cannot size shared region " + p + " to " + std::to_string(l.total) +
                              " bytes: " + errno_text(errno));
          try {
            ensure_backed(l.total, true);
          } catch (...) {
            (void)!ftruncate(fd_, 0);  // give the space back; the next attach starts over
            throw;
          }
        }
        map_region(l.total);
        bind_numa();
        init_header(l);
      } else {
        ensure_backed(l.total, true);
        map_region(l.total);
        bind_numa();
        // A lock word left by a process that died (or a previous boot, for a
        // persistent DAX region) must not block us: nobody else is attached.
        init_mutex();
      }
      data_ = base() + hdr_->data_off;
      ready(fresh ? Attached::kCreated : Attached::kAlone);
      flock(fd_, LOCK_SH);  // downgrade: others may attach now
      break;
    }
    if (errno != EWOULDBLOCK)
      throw RegionError("cannot lock shared region " + p + ": " + errno_text(errno));
    if (flock(fd_, LOCK_SH) != 0)
      throw RegionError("cannot lock shared region " + p + ": " + errno_text(errno));
    const uint64_t now_avail = file_bytes();
    if (now_avail >= kHeaderBytes && read_header(&h) && memcmp(h.magic, zeros, 8) != 0) {
      // Initialised (or foreign, or damaged: region_problem says which).
      std::string problem = region_problem(h, now_avail, l);
      if (!problem.empty())
        throw RegionError(problem + (opts_.reset ? " (reset cannot recreate a region other processes "
                                                   "are attached to; stop them first)"
                                                 : ""));
      ensure_backed(l.total, false);
      map_region(l.total);
      bind_numa();
      data_ = base() + hdr_->data_off;
      ready(Attached::kJoined);
      break;
    }
    flock(fd_, LOCK_UN);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// A process-shared robust mutex: a holder that dies hands the next locker
// EOWNERDEAD instead of a lock held forever.
void RegionFile::init_mutex() {
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&hdr_->mutex, &a);
  pthread_mutexattr_destroy(&a);
}

void RegionFile::init_header(const RegionLayout& l) {
  RegionHeader* h = hdr_;
  memset(static_cast<void*>(h), 0, kHeaderBytes);
  if (is_device_) {  // a file is zero after ftruncate; a device keeps old bytes
    memset(static_cast<uint8_t*>(base_) + l.buckets_off, 0, l.data_off - l.buckets_off);
  }
  h->layout_version = kLayoutVersion;
  h->header_bytes = kHeaderBytes;
  h->total_bytes = l.total;
  h->capacity = l.units * opts_.block_bytes;
  h->units = l.units;
  h->max_objects = opts_.max_objects;
  h->max_key_bytes = opts_.max_key_bytes;
  h->block_bytes = opts_.block_bytes;
  h->bucket_count = uint32_t(l.bucket_count);
  h->entry_stride = uint32_t(l.entry_stride);
  h->aux_max = kAuxMax;
  h->leases_per_entry = kLeasesPerEntry;
  h->mutex_bytes = sizeof(pthread_mutex_t);
  h->buckets_off = l.buckets_off;
  h->entries_off = l.entries_off;
  h->free_off = l.free_off;
  h->bitmap_off = l.bitmap_off;
  h->data_off = l.data_off;
  init_mutex();
  uint32_t* fs = reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(base_) + l.free_off);
  for (uint32_t i = 0; i < opts_.max_objects; ++i) fs[i] = opts_.max_objects - 1 - i;
  h->free_top = opts_.max_objects;
  h->geometry_sum = geometry_checksum(*h);
  std::atomic_thread_fence(std::memory_order_release);
  memcpy(h->magic, kRegionMagic, 8);
}

// header_problem, then whether the region matches this attach's settings.
std::string RegionFile::region_problem(const RegionHeader& h, uint64_t file_bytes, const RegionLayout& l) const {
  const std::string& p = opts_.path;
  if (memcmp(h.magic, kRegionMagic, 8) != 0)
    return p + " is not a StrataCache shared region (bad magic); remove it or set reset "
               "(tiers.shared.reset) to overwrite it";
  std::string problem = header_problem(h, file_bytes);
  if (!problem.empty()) return problem;
  const std::pair<const char*, std::pair<uint64_t, uint64_t>> settings[] = {
      {"capacity", {h.capacity, l.units * opts_.block_bytes}},
      {"max_objects", {h.max_objects, opts_.max_objects}},
      {"max_key_bytes", {h.max_key_bytes, opts_.max_key_bytes}},
      {"block_bytes", {h.block_bytes, opts_.block_bytes}},
  };
  for (const auto& [what, values] : settings)
    if (values.first != values.second)
      return p + " was created with " + what + "=" + std::to_string(values.first) +
             " but this attach asks for " + what + "=" + std::to_string(values.second) +
             "; use the same settings in every process or set reset to recreate it";
  return "";
}

}  // namespace stratacache
