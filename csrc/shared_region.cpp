// Shared-region object store: layout, attach protocol, index, allocator,
// eviction and crash repair. See shared_region.h for the design.
#include "shared_region.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older headers lack the name
#endif

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

namespace stratacache {
namespace {

constexpr char kMagic[8] = {'S', 'C', 'R', 'E', 'G', 'I', 'O', 'N'};
constexpr uint64_t kHeaderBytes = 4096;
constexpr uint64_t kNone = ~0ull;
constexpr uint64_t kTomb = ~0ull;

enum State : uint32_t { kFree = 0, kWriting = 1, kReady = 2, kRetired = 3 };

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

template <class T>
T load_acquire(const T& v) {
  return std::atomic_ref<T>(const_cast<T&>(v)).load(std::memory_order_acquire);
}
template <class T>
void store_release(T& v, T x) {
  std::atomic_ref<T>(v).store(x, std::memory_order_release);
}
void bump(uint64_t& counter, uint64_t n = 1) {
  std::atomic_ref<uint64_t>(counter).fetch_add(n, std::memory_order_relaxed);
}

std::string errno_text(int err) { return std::string(strerror(err)); }

// Start time (clock ticks since boot) and zombie state of a process, from
// /proc, so a recycled pid is not mistaken for the process that took a lease.
struct ProcInfo {
  bool exists = false;
  bool zombie = false;
  uint64_t start = 0;
};

ProcInfo proc_info(pid_t pid) {
  ProcInfo info;
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return info;
  char buf[1024];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return info;
  buf[n] = 0;
  char* p = strrchr(buf, ')');
  if (!p || p[1] != ' ') return info;
  info.exists = true;
  p += 2;  // field 3: state
  info.zombie = (*p == 'Z' || *p == 'X');
  for (int field = 3; field < 22 && *p; ++p)
    if (*p == ' ') ++field;
  info.start = strtoull(p, nullptr, 10);
  return info;
}

uint64_t self_start_time() {
  static std::atomic<int> cached_pid{0};
  static std::atomic<uint64_t> cached_start{0};
  int pid = getpid();
  if (cached_pid.load(std::memory_order_acquire) != pid) {
    cached_start.store(proc_info(pid).start, std::memory_order_relaxed);
    cached_pid.store(pid, std::memory_order_release);
  }
  return cached_start.load(std::memory_order_relaxed);
}

}  // namespace

uint64_t hash_key(std::string_view key) {
  const auto* p = reinterpret_cast<const uint8_t*>(key.data());
  size_t n = key.size();
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t(n) * 0xFF51AFD7ED558CCDull);
  auto mix = [](uint64_t v) {
    v ^= v >> 33;
    v *= 0xC4CEB9FE1A85EC53ull;
    v ^= v >> 29;
    return v;
  };
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    h = (h ^ mix(v)) * 0x9FB21C651E98DF25ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  uint64_t tail = 0;
  memcpy(&tail, p, n);
  h = (h ^ mix(tail ^ (uint64_t(n) << 56))) * 0x9FB21C651E98DF25ull;
  return mix(h);
}

struct SharedRegion::Header {
  char magic[8];  // written last: a region is initialised once it is set
  uint32_t layout_version;
  uint32_t header_bytes;
  uint64_t total_bytes;
  uint64_t capacity;  // data bytes = units * block_bytes
  uint64_t units;
  uint32_t max_objects, max_key_bytes, block_bytes, bucket_count;
  uint32_t entry_stride, aux_max, leases_per_entry, mutex_bytes;
  uint64_t buckets_off, entries_off, free_off, bitmap_off, data_off;
  uint64_t geometry_sum;  // geometry_checksum() of layout_version .. data_off
  alignas(64) pthread_mutex_t mutex;
  // Derived state, guarded by the mutex, rebuilt by repair.
  alignas(64) uint64_t used_bytes;
  uint64_t used_units;
  uint64_t items, writing, retired, tombstones;
  uint64_t global_gen, clock_hand, alloc_cursor;
  uint32_t free_top, pad0;
  // Counters persisted across restarts (atomic increments; read lock-free).
  alignas(64) uint64_t hits, misses, puts, put_failures, evictions, deletes, repairs,
      reclaimed_writers;
};

struct SharedRegion::Lease {
  uint32_t pid;
  uint32_t count;
  uint64_t start;
  uint64_t expiry_ns;
};

struct SharedRegion::Entry {
  uint32_t state;
  uint32_t key_len;
  uint64_t gen;  // changes whenever the entry is reserved or freed
  uint64_t hash;
  uint64_t unit;   // first allocation unit
  uint64_t units;  // allocation units held
  uint64_t size;   // payload bytes
  uint32_t aux_len;
  uint32_t ref;  // CLOCK reference bit
  uint32_t owner_pid;
  uint32_t pad;
  uint64_t owner_start;
  Lease leases[kLeasesPerEntry];
  uint8_t aux[kAuxMax];
  // key bytes follow (max_key_bytes)
};

struct SharedRegion::Layout {
  uint64_t units, bucket_count, entry_stride;
  uint64_t buckets_off, entries_off, free_off, bitmap_off, data_off, total;

  explicit Layout(const RegionOptions& o)
      : Layout(o.capacity, o.max_objects, o.max_key_bytes, o.block_bytes) {}

  // The arguments must be in the ranges the constructor (or header_problem)
  // enforces, so that nothing here overflows.
  Layout(uint64_t capacity, uint64_t max_objects, uint64_t max_key_bytes, uint64_t block_bytes) {
    static_assert(sizeof(Header) <= kHeaderBytes, "the header must fit its page");
    units = capacity / block_bytes;
    bucket_count = 8;
    while (bucket_count < 2ull * max_objects) bucket_count <<= 1;
    entry_stride = round_up(sizeof(Entry) + max_key_bytes, 64);
    buckets_off = kHeaderBytes;
    entries_off = round_up(buckets_off + bucket_count * 8, 64);
    free_off = round_up(entries_off + entry_stride * max_objects, 64);
    bitmap_off = round_up(free_off + 4ull * max_objects, 64);
    data_off = round_up(bitmap_off + (units + 63) / 64 * 8, std::max<uint64_t>(block_bytes, 4096));
    total = data_off + units * block_bytes;
  }
};

namespace {

// Largest data area and allocation unit a region may have; they keep every
// offset the layout derives far from 2^64.
constexpr uint64_t kMaxCapacity = 1ull << 56;
constexpr uint32_t kMaxBlockBytes = 1u << 30;

std::string octal(uint32_t v) {
  char b[16];
  snprintf(b, sizeof b, "0%o", v);
  return b;
}

}  // namespace

// Checksum of the header's geometry (every field from layout_version to
// data_off), so a flipped bit there is caught even where the fields still
// agree with each other.
uint64_t SharedRegion::geometry_checksum(const Header& h) {
  const char* begin = reinterpret_cast<const char*>(&h.layout_version);
  const char* end = reinterpret_cast<const char*>(&h.geometry_sum);
  return hash_key(std::string_view(begin, size_t(end - begin)));
}

// Why a header that carries the magic cannot be trusted, or "" when it can:
// every geometry field is checked against the others, against what this
// build derives from them, against the checksum and against the file size,
// before anything it describes is dereferenced.
std::string SharedRegion::header_problem(const Header& h, uint64_t file_bytes) const {
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
  const Layout l(h.capacity, h.max_objects, h.max_key_bytes, h.block_bytes);
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


// ---------------------------------------------------------------- attach

SharedRegion::SharedRegion(const RegionOptions& opts) : opts_(opts) {
  const std::string& p = opts_.path;
  if (p.empty()) throw std::invalid_argument("shared region path is empty");
  if (!opts_.read_only) {
    if (opts_.block_bytes < 64 || opts_.block_bytes > kMaxBlockBytes ||
        (opts_.block_bytes & (opts_.block_bytes - 1)))
      throw std::invalid_argument("block_bytes must be a power of two in [64, 2^30], got " +
                                  std::to_string(opts_.block_bytes));
    if (opts_.capacity < opts_.block_bytes)
      throw std::invalid_argument("capacity " + std::to_string(opts_.capacity) +
                                  " is smaller than one block (" +
                                  std::to_string(opts_.block_bytes) + " bytes)");
    if (opts_.capacity > kMaxCapacity)
      throw std::invalid_argument("capacity " + std::to_string(opts_.capacity) + " exceeds 2^56 bytes");
    if (opts_.max_objects < 1 || opts_.max_objects > (1u << 30))
      throw std::invalid_argument("max_objects must be in [1, 2^30], got " +
                                  std::to_string(opts_.max_objects));
    if (opts_.max_key_bytes < 1 || opts_.max_key_bytes > 65536)
      throw std::invalid_argument("max_key_bytes must be in [1, 65536], got " +
                                  std::to_string(opts_.max_key_bytes));
    if (opts_.file_mode & ~0777u)
      throw std::invalid_argument("file_mode must be a permission mode like 0600, got " +
                                  octal(opts_.file_mode));
    if (opts_.file_mode & 0007)
      throw std::invalid_argument("file_mode " + octal(opts_.file_mode) +
                                  " gives access to all users; a shared region must not be "
                                  "world-accessible (use 0600, or 0660 for a group)");
  }
  open_file();
  try {
    attach();
  } catch (...) {
    if (base_) munmap(base_, map_bytes_);
    close(fd_);
    throw;
  }
}

SharedRegion::~SharedRegion() {
  if (base_) munmap(base_, map_bytes_);
  if (fd_ >= 0) close(fd_);  // also drops our flock
}

void SharedRegion::open_file() {
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

void SharedRegion::map_region(uint64_t bytes) {
  int prot = PROT_READ | (opts_.read_only ? 0 : PROT_WRITE);
  void* p = mmap(nullptr, bytes, prot, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED)
    throw RegionError("cannot map shared region " + opts_.path + " (" + std::to_string(bytes) +
                      " bytes): " + errno_text(errno));
  base_ = p;
  map_bytes_ = bytes;
  hdr_ = static_cast<Header*>(p);
}

void SharedRegion::bind_numa() {
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
bool SharedRegion::read_header(Header* h) const {
  if (!is_device_) return pread(fd_, h, sizeof(Header), 0) == ssize_t(sizeof(Header));
  // Device DAX supports only mmap (in units of its alignment, up to 2 MiB).
  const size_t bytes = size_t(std::min<uint64_t>(device_bytes(fd_, opts_.path), 2ull << 20));
  void* m = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd_, 0);
  if (m == MAP_FAILED) return false;
  memcpy(static_cast<void*>(h), m, sizeof(Header));
  munmap(m, bytes);
  return true;
}

uint64_t SharedRegion::file_bytes() const {
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
void SharedRegion::ensure_backed(uint64_t total, bool alone) {
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

void SharedRegion::attach() {
  const std::string& p = opts_.path;
  Header h;
  if (opts_.read_only) {
    // Inspection: validate the header, then map what it describes.
    const uint64_t avail = file_bytes();
    if (avail < kHeaderBytes || !read_header(&h))
      throw RegionError(p + " is too small to be a StrataCache shared region");
    if (memcmp(h.magic, kMagic, 8) != 0)
      throw RegionError(p + " is not an initialised StrataCache shared region (bad magic)");
    std::string problem = header_problem(h, avail);
    if (!problem.empty()) throw RegionError(problem);
    ensure_backed(h.total_bytes, false);
    map_region(h.total_bytes);
    data_ = static_cast<uint8_t*>(base_) + hdr_->data_off;
    return;
  }

  Layout l(opts_);
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
      // A newer layout is refused below, so an older build never destroys it.
      if (!fresh && memcmp(h.magic, kMagic, 8) == 0 && h.layout_version < kLayoutVersion) fresh = true;
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
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(&hdr_->mutex, &a);
        pthread_mutexattr_destroy(&a);
        lock();
        repair_locked(true);
        unlock();
        if (opts_.reset) clear();
      }
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
      // Others keep the derived state up to date; a damaged one (a counter or
      // the free-stack top out of range) is rebuilt, never trusted.
      lock();
      if (!derived_state_sane_locked()) repair_locked(false);
      unlock();
      if (opts_.reset) clear();
      break;
    }
    flock(fd_, LOCK_UN);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  data_ = static_cast<uint8_t*>(base_) + hdr_->data_off;
}

void SharedRegion::init_header(const Layout& l) {
  Header* h = hdr_;
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
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&h->mutex, &a);
  pthread_mutexattr_destroy(&a);
  uint32_t* fs = reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(base_) + l.free_off);
  for (uint32_t i = 0; i < opts_.max_objects; ++i) fs[i] = opts_.max_objects - 1 - i;
  h->free_top = opts_.max_objects;
  h->geometry_sum = geometry_checksum(*h);
  std::atomic_thread_fence(std::memory_order_release);
  memcpy(h->magic, kMagic, 8);
}

// header_problem, then whether the region matches this attach's settings.
std::string SharedRegion::region_problem(const Header& h, uint64_t file_bytes, const Layout& l) const {
  const std::string& p = opts_.path;
  if (memcmp(h.magic, kMagic, 8) != 0)
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

// ---------------------------------------------------------------- locking

void SharedRegion::lock() {
  if (opts_.read_only) throw RegionError("shared region " + opts_.path + " is attached read-only");
  int rc = pthread_mutex_lock(&hdr_->mutex);
  if (rc == EOWNERDEAD) {
    // The previous holder died inside a critical section: rebuild every
    // derived structure from the entries before anyone uses them.
    repair_locked(false);
    pthread_mutex_consistent(&hdr_->mutex);
  } else if (rc != 0) {
    throw RegionError("cannot lock shared region " + opts_.path + ": " + errno_text(rc) +
                      "; stop every process using it and attach again");
  }
}

void SharedRegion::unlock() { pthread_mutex_unlock(&hdr_->mutex); }

namespace {
struct Guard {
  explicit Guard(SharedRegion* r, void (SharedRegion::*l)(), void (SharedRegion::*u)())
      : r_(r), u_(u) {
    (r_->*l)();
  }
  ~Guard() { (r_->*u_)(); }
  SharedRegion* r_;
  void (SharedRegion::*u_)();
};
}  // namespace
#define REGION_LOCKED Guard guard_(this, &SharedRegion::lock, &SharedRegion::unlock)

void SharedRegion::lock_and_leak_for_testing() { lock(); }

// ---------------------------------------------------------------- accessors

SharedRegion::Entry* SharedRegion::entry(uint32_t i) const {
  return reinterpret_cast<Entry*>(static_cast<uint8_t*>(base_) + hdr_->entries_off +
                                  uint64_t(i) * hdr_->entry_stride);
}
std::string_view SharedRegion::entry_key(const Entry* e) const {
  return {reinterpret_cast<const char*>(e + 1), std::min<uint32_t>(e->key_len, hdr_->max_key_bytes)};
}
uint64_t* SharedRegion::buckets() const {
  return reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(base_) + hdr_->buckets_off);
}
uint64_t* SharedRegion::bitmap() const {
  return reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(base_) + hdr_->bitmap_off);
}
uint32_t* SharedRegion::free_stack() const {
  return reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(base_) + hdr_->free_off);
}
uint64_t SharedRegion::data_bytes() const { return hdr_->capacity; }

// ---------------------------------------------------------------- bitmap

void SharedRegion::set_bits(uint64_t start, uint64_t len, bool value) {
  uint64_t* bm = bitmap();
  uint64_t i = start, end = start + len;
  while (i < end) {
    if ((i & 63) == 0 && i + 64 <= end) {
      bm[i >> 6] = value ? ~0ull : 0;
      i += 64;
      continue;
    }
    if (value) bm[i >> 6] |= 1ull << (i & 63);
    else bm[i >> 6] &= ~(1ull << (i & 63));
    ++i;
  }
}

bool SharedRegion::any_bit(uint64_t start, uint64_t len, bool value) const {
  const uint64_t* bm = bitmap();
  for (uint64_t i = start, end = start + len; i < end;) {
    if ((i & 63) == 0 && i + 64 <= end) {
      uint64_t w = bm[i >> 6];
      if (value ? w != 0 : w != ~0ull) return true;
      i += 64;
      continue;
    }
    if (bool((bm[i >> 6] >> (i & 63)) & 1) == value) return true;
    ++i;
  }
  return false;
}

uint64_t SharedRegion::find_free_run(uint64_t need) const {
  const uint64_t* bm = bitmap();
  const uint64_t units = hdr_->units;
  auto scan = [&](uint64_t from, uint64_t to) -> uint64_t {
    uint64_t run_start = from, run_len = 0;
    for (uint64_t i = from; i < to;) {
      if ((i & 63) == 0 && i + 64 <= to) {
        uint64_t w = bm[i >> 6];
        if (w == ~0ull) {
          run_len = 0;
          i += 64;
          continue;
        }
        if (w == 0) {
          if (run_len == 0) run_start = i;
          run_len += 64;
          i += 64;
          if (run_len >= need) return run_start;
          continue;
        }
      }
      if ((bm[i >> 6] >> (i & 63)) & 1) {
        run_len = 0;
      } else {
        if (run_len == 0) run_start = i;
        if (++run_len >= need) return run_start;
      }
      ++i;
    }
    return kNone;
  };
  if (need == 0) return 0;
  uint64_t cursor = hdr_->alloc_cursor < units ? hdr_->alloc_cursor : 0;
  uint64_t r = scan(cursor, units);
  if (r == kNone && cursor > 0) r = scan(0, std::min(units, cursor + need));
  return r;
}

uint64_t SharedRegion::run_around(uint64_t start, uint64_t len, uint64_t need) const {
  const uint64_t* bm = bitmap();
  auto is_set = [&](uint64_t i) { return (bm[i >> 6] >> (i & 63)) & 1; };
  uint64_t l = start, r = start + len;
  while (l > 0 && r - l < need && !is_set(l - 1)) --l;
  while (r < hdr_->units && r - l < need && !is_set(r)) ++r;
  return r - l >= need ? l : kNone;
}

// ---------------------------------------------------------------- index

int64_t SharedRegion::lookup_locked(std::string_view key, uint64_t hash, uint64_t* pos) const {
  const uint64_t* b = buckets();
  const uint64_t mask = hdr_->bucket_count - 1;
  const uint32_t tag = uint32_t(hash >> 32);
  for (uint64_t probe = 0; probe <= mask; ++probe) {
    uint64_t p = (hash + probe) & mask;
    uint64_t v = b[p];
    if (v == 0) return -1;
    if (v == kTomb || uint32_t(v >> 32) != tag) continue;
    uint64_t idx = (v & 0xffffffffull) - 1;
    if (idx >= hdr_->max_objects) continue;
    const Entry* e = entry(uint32_t(idx));
    if (e->state == kReady && e->hash == hash && e->key_len == key.size() &&
        memcmp(e + 1, key.data(), key.size()) == 0) {
      if (pos) *pos = p;
      return int64_t(idx);
    }
  }
  return -1;
}

void SharedRegion::bucket_insert_locked(uint32_t slot, uint64_t hash) {
  const uint64_t nb = hdr_->bucket_count;
  if ((hdr_->items + hdr_->tombstones + 1) * 4 > nb * 3) {
    rebuild_buckets_locked();  // re-inserts every READY entry, this one included
    if (entry(slot)->state == kReady) return;
  }
  uint64_t* b = buckets();
  for (uint64_t probe = 0; probe < nb; ++probe) {
    uint64_t p = (hash + probe) & (nb - 1);
    if (b[p] == 0 || b[p] == kTomb) {
      if (b[p] == kTomb) --hdr_->tombstones;
      store_release(b[p], (uint64_t(uint32_t(hash >> 32)) << 32) | (uint64_t(slot) + 1));
      return;
    }
  }
}

// Rebuilds the buckets from the READY entries (drops tombstones). Does not
// touch hdr_->items: callers own that count.
void SharedRegion::rebuild_buckets_locked() {
  const uint64_t nb = hdr_->bucket_count;
  uint64_t* b = buckets();
  memset(b, 0, nb * 8);
  hdr_->tombstones = 0;
  for (uint32_t i = 0; i < hdr_->max_objects; ++i) {
    Entry* e = entry(i);
    if (e->state != kReady) continue;
    for (uint64_t probe = 0; probe < nb; ++probe) {
      uint64_t p = (e->hash + probe) & (nb - 1);
      if (b[p] == 0) {
        b[p] = (uint64_t(uint32_t(e->hash >> 32)) << 32) | (uint64_t(i) + 1);
        break;
      }
    }
  }
}

// ---------------------------------------------------------------- leases

bool SharedRegion::owner_alive(uint32_t pid, uint64_t start) const {
  if (pid == 0) return false;
  if (pid == uint32_t(getpid())) return start == 0 || start == self_start_time();
  if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
  ProcInfo info = proc_info(pid_t(pid));
  if (!info.exists) return true;  // no /proc (or it just exited): trust kill()
  if (info.zombie) return false;
  return start == 0 || info.start == 0 || info.start == start;
}

// True if a live, unexpired reader holds the entry; drops dead/expired leases.
bool SharedRegion::pinned_locked(Entry* e, uint64_t now) {
  bool pinned = false;
  for (Lease& l : e->leases) {
    if (l.count == 0) continue;
    if (l.expiry_ns <= now || !owner_alive(l.pid, l.start)) {
      l = Lease{};
      continue;
    }
    pinned = true;
  }
  return pinned;
}

// ---------------------------------------------------------------- entries

void SharedRegion::free_entry_locked(uint32_t slot) {
  Entry* e = entry(slot);
  switch (e->state) {
    case kReady:
      --hdr_->items;
      hdr_->used_bytes -= e->size;
      break;
    case kWriting:
      --hdr_->writing;
      break;
    case kRetired:
      --hdr_->retired;
      break;
    default:
      return;
  }
  set_bits(e->unit, e->units, false);
  hdr_->used_units -= e->units;
  store_release(e->gen, ++hdr_->global_gen);
  store_release(e->state, uint32_t(kFree));
  for (Lease& l : e->leases) l = Lease{};
  free_stack()[hdr_->free_top++] = slot;
}

// Takes a READY entry out of service (its bucket is already gone or replaced):
// freed now, or kept RETIRED until the readers holding it finish.
void SharedRegion::retire_or_free_locked(uint32_t slot, uint64_t now) {
  Entry* e = entry(slot);
  if (e->state == kReady && pinned_locked(e, now)) {
    --hdr_->items;
    hdr_->used_bytes -= e->size;
    ++hdr_->retired;
    store_release(e->state, uint32_t(kRetired));
    return;
  }
  free_entry_locked(slot);
}

// Advances the CLOCK hand (at most two sweeps). Space nobody can use any more
// (a dead writer's reservation, a retired version no reader holds) is freed on
// the way: the hand stops there and reports the freed range. Otherwise it stops
// at an unpinned READY entry whose reference bit is clear and returns it.
SharedRegion::ClockStop SharedRegion::clock_step_locked(uint64_t now) {
  const uint64_t n = hdr_->max_objects;
  for (uint64_t step = 0; step < 2 * n + 1; ++step) {
    uint32_t i = uint32_t(hdr_->clock_hand % n);
    hdr_->clock_hand = (i + 1) % n;
    Entry* e = entry(i);
    uint32_t st = e->state;
    if (st == kReady) {
      if (pinned_locked(e, now)) continue;
      if (e->ref) {
        e->ref = 0;
        continue;
      }
      return ClockStop{int64_t(i), 0, 0, false};
    }
    bool dead_writer = st == kWriting && !owner_alive(e->owner_pid, e->owner_start);
    if (dead_writer || (st == kRetired && !pinned_locked(e, now))) {
      if (dead_writer) bump(hdr_->reclaimed_writers);
      ClockStop stop{-1, e->unit, e->units, true};
      free_entry_locked(i);
      return stop;
    }
  }
  return ClockStop{};
}

bool SharedRegion::evict_one_locked(uint64_t need_units, uint64_t* run_start) {
  ClockStop stop = clock_step_locked(now_ns());
  if (stop.victim >= 0) {
    uint32_t i = uint32_t(stop.victim);
    Entry* e = entry(i);
    uint64_t pos;
    if (lookup_locked(entry_key(e), e->hash, &pos) == stop.victim) {
      store_release(buckets()[pos], kTomb);
      ++hdr_->tombstones;
    }
    bump(hdr_->evictions);
    stop = ClockStop{-1, e->unit, e->units, true};
    free_entry_locked(i);
  }
  if (!stop.freed) return false;
  *run_start = need_units ? run_around(stop.unit, stop.units, need_units) : kNone;
  return true;
}

// ---------------------------------------------------------------- writers

std::optional<Reservation> SharedRegion::reserve(std::string_view key, uint64_t size,
                                                 std::string_view aux, bool evict) {
  if (key.empty() || key.size() > hdr_->max_key_bytes)
    throw std::invalid_argument("key of " + std::to_string(key.size()) +
                                " bytes does not fit the shared region's max_key_bytes=" +
                                std::to_string(hdr_->max_key_bytes));
  if (aux.size() > kAuxMax)
    throw std::invalid_argument("metadata of " + std::to_string(aux.size()) +
                                " bytes exceeds the shared region limit of " + std::to_string(kAuxMax));
  const uint64_t block = hdr_->block_bytes;
  const uint64_t units = (size + block - 1) / block;
  const uint64_t hash = hash_key(key);
  REGION_LOCKED;
  if (units > hdr_->units) {
    bump(hdr_->put_failures);
    return std::nullopt;
  }
  while (hdr_->free_top == 0) {
    uint64_t ignored;
    if (!evict || !evict_one_locked(0, &ignored)) {
      if (evict) bump(hdr_->put_failures);
      return std::nullopt;
    }
  }
  uint64_t unit = find_free_run(units);
  while (unit == kNone) {
    if (!evict || !evict_one_locked(units, &unit)) {
      if (evict) bump(hdr_->put_failures);
      return std::nullopt;
    }
  }
  // Fill the entry completely before publishing its state: a death before the
  // state store leaves a FREE entry that repair returns to the free stack.
  uint32_t slot = free_stack()[--hdr_->free_top];
  Entry* e = entry(slot);
  e->key_len = uint32_t(key.size());
  memcpy(e + 1, key.data(), key.size());
  e->hash = hash;
  e->unit = unit;
  e->units = units;
  e->size = size;
  e->aux_len = uint32_t(aux.size());
  memcpy(e->aux, aux.data(), aux.size());
  e->ref = 1;
  e->owner_pid = uint32_t(getpid());
  e->owner_start = self_start_time();
  for (Lease& l : e->leases) l = Lease{};
  uint64_t gen = ++hdr_->global_gen;
  store_release(e->gen, gen);
  set_bits(unit, units, true);
  hdr_->used_units += units;
  ++hdr_->writing;
  hdr_->alloc_cursor = unit + units;
  store_release(e->state, uint32_t(kWriting));
  return Reservation{slot, gen, unit * block, size};
}

bool SharedRegion::commit(const Reservation& r) {
  if (r.slot >= hdr_->max_objects) return false;
  REGION_LOCKED;
  Entry* e = entry(r.slot);
  if (e->gen != r.gen || e->state != kWriting) return false;  // reclaimed or cleared meanwhile
  uint64_t pos = 0;
  int64_t old = lookup_locked(entry_key(e), e->hash, &pos);
  // Publish the new version before retiring the old one: a death in between
  // leaves two READY versions, and repair keeps the newer.
  --hdr_->writing;
  ++hdr_->items;
  hdr_->used_bytes += e->size;
  store_release(e->state, uint32_t(kReady));
  if (old >= 0) {
    store_release(buckets()[pos], (uint64_t(uint32_t(e->hash >> 32)) << 32) | (uint64_t(r.slot) + 1));
    retire_or_free_locked(uint32_t(old), now_ns());
  } else {
    bucket_insert_locked(r.slot, e->hash);
  }
  bump(hdr_->puts);
  return true;
}

void SharedRegion::abort(const Reservation& r) {
  if (r.slot >= hdr_->max_objects) return;
  REGION_LOCKED;
  Entry* e = entry(r.slot);
  if (e->gen == r.gen && e->state == kWriting) free_entry_locked(r.slot);
}

bool SharedRegion::put(std::string_view key, const void* src, uint64_t size, std::string_view aux) {
  auto r = reserve(key, size, aux);
  if (!r) return false;
  if (size) memcpy(data_ + r->offset, src, size);
  return commit(*r);
}

// ---------------------------------------------------------------- readers

ReadHandle SharedRegion::handle_locked(uint32_t slot) const {
  const Entry* e = entry(slot);
  return ReadHandle{slot, e->gen, e->unit * hdr_->block_bytes, e->size,
                    std::string(reinterpret_cast<const char*>(e->aux), e->aux_len)};
}

// Adds (or extends) this process's lease on the entry. False when all lease
// records belong to other live readers: the caller reads without a lease and
// relies on the generation re-check after its copy.
bool SharedRegion::add_lease_locked(Entry* e, uint64_t now, double lease_s) {
  const uint64_t expiry = now + uint64_t(std::max(lease_s, 0.0) * 1e9);
  const uint32_t pid = uint32_t(getpid());
  Lease* empty = nullptr;
  for (Lease& l : e->leases) {
    if (l.count && l.pid == pid) {
      ++l.count;
      l.expiry_ns = std::max(l.expiry_ns, expiry);
      return true;
    }
    if (!l.count && !empty) empty = &l;
  }
  if (!empty) {  // all records taken: drop dead and expired ones
    pinned_locked(e, now);
    for (Lease& l : e->leases)
      if (!l.count) {
        empty = &l;
        break;
      }
  }
  if (!empty) return false;
  *empty = Lease{pid, 1, self_start_time(), expiry};
  return true;
}

std::optional<ReadHandle> SharedRegion::acquire(std::string_view key, double lease_s, bool count_stats) {
  const uint64_t hash = hash_key(key);
  REGION_LOCKED;
  int64_t idx = lookup_locked(key, hash, nullptr);
  if (idx < 0) {
    if (count_stats) bump(hdr_->misses);
    return std::nullopt;
  }
  Entry* e = entry(uint32_t(idx));
  e->ref = 1;
  add_lease_locked(e, now_ns(), lease_s);
  if (count_stats) bump(hdr_->hits);
  return handle_locked(uint32_t(idx));
}

std::optional<std::pair<std::string, ReadHandle>> SharedRegion::pick_victim(double lease_s) {
  REGION_LOCKED;
  const uint64_t now = now_ns();
  for (uint64_t tries = 0; tries <= hdr_->max_objects; ++tries) {
    ClockStop stop = clock_step_locked(now);
    if (stop.victim >= 0 && add_lease_locked(entry(uint32_t(stop.victim)), now, lease_s))
      return std::make_pair(std::string(entry_key(entry(uint32_t(stop.victim)))),
                            handle_locked(uint32_t(stop.victim)));
    if (stop.victim < 0 && !stop.freed) break;
  }
  return std::nullopt;
}

bool SharedRegion::release(uint32_t slot, uint64_t gen) {
  if (slot >= hdr_->max_objects) return false;
  const uint32_t pid = uint32_t(getpid());
  REGION_LOCKED;
  Entry* e = entry(slot);
  if (e->gen != gen) return false;
  for (Lease& l : e->leases) {
    if (l.count && l.pid == pid) {
      if (--l.count == 0) l = Lease{};
      break;
    }
  }
  if (e->state == kRetired && !pinned_locked(e, now_ns())) {
    free_entry_locked(slot);
    return true;  // it stayed intact until now
  }
  return e->state == kReady || e->state == kRetired;
}

bool SharedRegion::is_current(uint32_t slot, uint64_t gen) const {
  if (slot >= hdr_->max_objects) return false;
  const Entry* e = entry(slot);
  uint32_t st = load_acquire(e->state);
  return load_acquire(e->gen) == gen && (st == kReady || st == kRetired);
}

std::optional<ReadHandle> SharedRegion::get(std::string_view key, void* out, uint64_t out_cap) {
  auto h = acquire(key, 30.0);
  if (!h) return std::nullopt;
  if (h->size > out_cap) {
    release(h->slot, h->gen);
    return std::nullopt;
  }
  if (h->size) memcpy(out, data_ + h->offset, h->size);
  if (!release(h->slot, h->gen)) return std::nullopt;
  return h;
}

bool SharedRegion::contains(std::string_view key) {
  const uint64_t hash = hash_key(key);
  REGION_LOCKED;
  return lookup_locked(key, hash, nullptr) >= 0;
}

void SharedRegion::contains_many(const std::string_view* keys, size_t n, uint8_t* out) {
  std::vector<uint64_t> hashes(n);
  for (size_t i = 0; i < n; ++i) hashes[i] = hash_key(keys[i]);
  REGION_LOCKED;
  for (size_t i = 0; i < n; ++i) out[i] = lookup_locked(keys[i], hashes[i], nullptr) >= 0;
}

bool SharedRegion::erase(std::string_view key) {
  const uint64_t hash = hash_key(key);
  REGION_LOCKED;
  uint64_t pos;
  int64_t idx = lookup_locked(key, hash, &pos);
  if (idx < 0) return false;
  store_release(buckets()[pos], kTomb);
  ++hdr_->tombstones;
  retire_or_free_locked(uint32_t(idx), now_ns());
  bump(hdr_->deletes);
  return true;
}

bool SharedRegion::erase_version(uint32_t slot, uint64_t gen, bool evicted) {
  if (slot >= hdr_->max_objects) return false;
  REGION_LOCKED;
  Entry* e = entry(slot);
  if (e->gen != gen || e->state != kReady) return false;
  uint64_t pos;
  if (lookup_locked(entry_key(e), e->hash, &pos) != int64_t(slot)) return false;
  store_release(buckets()[pos], kTomb);
  ++hdr_->tombstones;
  retire_or_free_locked(slot, now_ns());
  bump(evicted ? hdr_->evictions : hdr_->deletes);
  return true;
}

std::vector<std::string> SharedRegion::keys() {
  std::vector<std::string> out;
  REGION_LOCKED;
  for (uint32_t i = 0; i < hdr_->max_objects; ++i) {
    const Entry* e = entry(i);
    if (e->state == kReady) out.emplace_back(entry_key(e));
  }
  return out;
}

void SharedRegion::clear() {
  REGION_LOCKED;
  for (uint32_t i = 0; i < hdr_->max_objects; ++i)
    if (entry(i)->state != kFree) free_entry_locked(i);
  memset(buckets(), 0, uint64_t(hdr_->bucket_count) * 8);
  hdr_->tombstones = 0;
  hdr_->alloc_cursor = 0;  // an empty region starts packing from the front again
}

uint64_t SharedRegion::prefault(uint64_t max_bytes) {
  std::vector<std::pair<uint64_t, uint64_t>> extents;  // (offset, bytes) in data_
  uint64_t covered = 0;
  {
    REGION_LOCKED;
    for (uint32_t i = 0; i < hdr_->max_objects && covered < max_bytes; ++i) {
      const Entry* e = entry(i);
      if (e->state != kReady || e->size == 0) continue;
      const uint64_t n = std::min<uint64_t>(e->size, max_bytes - covered);
      extents.emplace_back(e->unit * hdr_->block_bytes, n);
      covered += n;
    }
  }
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  bool use_madvise = true;
  uint64_t done = 0;
  for (const auto& [off, n] : extents) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data_ + off) & ~(page - 1);
    const uintptr_t end = reinterpret_cast<uintptr_t>(data_ + off + n);
    if (use_madvise) {
      if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ) == 0) {
        done += n;
        continue;
      }
      if (errno != EINVAL) break;  // EFAULT/ENOMEM: stop; this is only a hint
      use_madvise = false;         // kernel older than 5.14
    }
    for (uintptr_t p = begin; p < end; p += page) (void)*reinterpret_cast<volatile const uint8_t*>(p);
    done += n;
  }
  return done;
}

std::vector<ObjectInfo> SharedRegion::snapshot() const {
  std::vector<ObjectInfo> out;
  const uint32_t n = hdr_->max_objects;
  for (uint32_t i = 0; i < n; ++i) {
    const Entry* e = entry(i);
    if (load_acquire(e->state) != kReady) continue;
    uint64_t gen = load_acquire(e->gen);
    ObjectInfo info;
    info.key.assign(reinterpret_cast<const char*>(e + 1),
                    std::min<uint32_t>(load_acquire(e->key_len), hdr_->max_key_bytes));
    info.size = load_acquire(e->size);
    info.aux.assign(reinterpret_cast<const char*>(e->aux), std::min<uint32_t>(load_acquire(e->aux_len), kAuxMax));
    std::atomic_thread_fence(std::memory_order_acquire);
    if (load_acquire(e->gen) == gen && load_acquire(e->state) == kReady) out.push_back(std::move(info));
  }
  return out;
}

RegionStats SharedRegion::stats() const {
  const Header* h = hdr_;
  RegionStats s;
  s.capacity = h->capacity;
  s.block_bytes = h->block_bytes;
  s.max_objects = h->max_objects;
  s.max_key_bytes = h->max_key_bytes;
  s.items = load_acquire(h->items);
  s.used_bytes = load_acquire(h->used_bytes);
  s.reserved_bytes = load_acquire(h->used_units) * h->block_bytes;
  s.writing = load_acquire(h->writing);
  s.retired = load_acquire(h->retired);
  s.hits = load_acquire(h->hits);
  s.misses = load_acquire(h->misses);
  s.puts = load_acquire(h->puts);
  s.put_failures = load_acquire(h->put_failures);
  s.evictions = load_acquire(h->evictions);
  s.deletes = load_acquire(h->deletes);
  s.repairs = load_acquire(h->repairs);
  s.reclaimed_writers = load_acquire(h->reclaimed_writers);
  return s;
}

size_t SharedRegion::reclaim() {
  REGION_LOCKED;
  size_t freed = 0;
  const uint64_t now = now_ns();
  for (uint32_t i = 0; i < hdr_->max_objects; ++i) {
    Entry* e = entry(i);
    if (e->state == kWriting && !owner_alive(e->owner_pid, e->owner_start)) {
      bump(hdr_->reclaimed_writers);
      free_entry_locked(i);
      ++freed;
    } else if (e->state == kRetired && !pinned_locked(e, now)) {
      free_entry_locked(i);
      ++freed;
    } else if (e->state == kReady) {
      pinned_locked(e, now);
    }
  }
  return freed;
}

// ---------------------------------------------------------------- repair

// Cheap invariants of the derived state in the header (no pass over the
// entries): what an attach checks before trusting a region others are using.
bool SharedRegion::derived_state_sane_locked() const {
  const Header* h = hdr_;
  return h->free_top <= h->max_objects &&
         uint64_t(h->free_top) + h->items + h->writing + h->retired == h->max_objects &&
         h->used_units <= h->units && h->used_bytes <= h->capacity && h->tombstones <= h->bucket_count;
}

void SharedRegion::repair_locked(bool sole) {
  rebuild_locked(sole);
  bump(hdr_->repairs);
}

void SharedRegion::rebuild_locked(bool sole) {
  Header* h = hdr_;
  const uint32_t n = h->max_objects;
  const uint64_t now = now_ns();
  memset(bitmap(), 0, (h->units + 63) / 64 * 8);
  h->used_bytes = h->used_units = h->items = h->writing = h->retired = 0;
  uint64_t max_gen = h->global_gen;
  auto drop = [&](Entry* e) {
    e->state = kFree;
    for (Lease& l : e->leases) l = Lease{};
  };
  // Pass 1: validate each entry and rebuild the space accounting.
  for (uint32_t i = 0; i < n; ++i) {
    Entry* e = entry(i);
    max_gen = std::max(max_gen, e->gen);
    uint32_t st = e->state;
    if (st == kFree) continue;
    bool sane = st <= kRetired && e->key_len >= 1 && e->key_len <= h->max_key_bytes &&
                e->aux_len <= kAuxMax && e->units <= h->units && e->unit <= h->units - e->units &&
                e->size <= e->units * h->block_bytes;
    if (!sane || any_bit(e->unit, e->units, true)) {
      drop(e);
      continue;
    }
    if (st == kWriting && (sole || !owner_alive(e->owner_pid, e->owner_start))) {
      bump(h->reclaimed_writers);
      drop(e);
      continue;
    }
    if (sole) {
      for (Lease& l : e->leases) l = Lease{};
    }
    bool pinned = pinned_locked(e, now);
    if (st == kRetired && !pinned) {
      drop(e);
      continue;
    }
    set_bits(e->unit, e->units, true);
    h->used_units += e->units;
    if (st == kWriting) ++h->writing;
    if (st == kRetired) ++h->retired;
  }
  // Pass 2: one READY version per key (the newest) in freshly built buckets.
  memset(buckets(), 0, uint64_t(h->bucket_count) * 8);
  h->tombstones = 0;
  h->free_top = 0;
  for (uint32_t i = 0; i < n; ++i) {
    Entry* e = entry(i);
    if (e->state != kReady) continue;
    uint64_t pos;
    int64_t other = lookup_locked(entry_key(e), e->hash, &pos);
    Entry* loser = nullptr;
    if (other < 0) {
      bucket_insert_locked(i, e->hash);
    } else if (entry(uint32_t(other))->gen > e->gen) {
      loser = e;
    } else {
      loser = entry(uint32_t(other));
      store_release(buckets()[pos], (uint64_t(uint32_t(e->hash >> 32)) << 32) | (uint64_t(i) + 1));
      --h->items;
      h->used_bytes -= loser->size;
    }
    if (loser) {
      set_bits(loser->unit, loser->units, false);
      h->used_units -= loser->units;
      drop(loser);
    }
    if (loser != e) {
      ++h->items;
      h->used_bytes += e->size;
    }
  }
  // Pass 3: free stack and generations (every handle on a dropped entry dies).
  uint32_t* fs = free_stack();
  for (uint32_t i = n; i-- > 0;) {
    Entry* e = entry(i);
    if (e->state == kFree) {
      e->gen = ++max_gen;
      fs[h->free_top++] = i;
    }
  }
  h->global_gen = max_gen;
  h->clock_hand %= n;
  if (h->alloc_cursor >= h->units) h->alloc_cursor = 0;
}

// ---------------------------------------------------------------- audit

std::vector<std::string> SharedRegion::check() {
  std::vector<std::string> problems;
  auto fail = [&](const std::string& s) { problems.push_back(s); };
  REGION_LOCKED;
  const Header* h = hdr_;
  const uint32_t n = h->max_objects;
  std::vector<uint64_t> bits((h->units + 63) / 64, 0);
  uint64_t used_bytes = 0, used_units = 0, items = 0, writing = 0, retired = 0;
  std::vector<uint8_t> in_free(n, 0);
  for (uint32_t k = 0; k < h->free_top; ++k) {
    uint32_t s = free_stack()[k];
    if (s >= n) fail("free stack holds out-of-range slot " + std::to_string(s));
    else if (in_free[s]++) fail("slot " + std::to_string(s) + " is twice on the free stack");
  }
  for (uint32_t i = 0; i < n; ++i) {
    const Entry* e = entry(i);
    uint32_t st = e->state;
    if (st == kFree) {
      if (!in_free[i]) fail("free slot " + std::to_string(i) + " is not on the free stack");
      continue;
    }
    if (in_free[i]) fail("slot " + std::to_string(i) + " is in use but on the free stack");
    if (st > kRetired) {
      fail("slot " + std::to_string(i) + " has invalid state " + std::to_string(st));
      continue;
    }
    if (e->unit + e->units > h->units) {
      fail("slot " + std::to_string(i) + " extends past the data area");
      continue;
    }
    for (uint64_t u = e->unit; u < e->unit + e->units; ++u) {
      if ((bits[u >> 6] >> (u & 63)) & 1) {
        fail("slot " + std::to_string(i) + " overlaps another object at unit " + std::to_string(u));
        break;
      }
      bits[u >> 6] |= 1ull << (u & 63);
    }
    used_units += e->units;
    if (st == kWriting) ++writing;
    if (st == kRetired) ++retired;
    if (st == kReady) {
      ++items;
      used_bytes += e->size;
      if (lookup_locked(entry_key(e), e->hash, nullptr) != int64_t(i))
        fail("ready slot " + std::to_string(i) + " is not found through the index");
    }
  }
  if (memcmp(bits.data(), bitmap(), bits.size() * 8) != 0) fail("allocation bitmap differs from the entries");
  uint64_t live_buckets = 0, tombs = 0;
  for (uint64_t p = 0; p < h->bucket_count; ++p) {
    uint64_t v = buckets()[p];
    if (v == kTomb) ++tombs;
    else if (v) {
      ++live_buckets;
      uint64_t idx = (v & 0xffffffffull) - 1;
      if (idx >= n || entry(uint32_t(idx))->state != kReady)
        fail("bucket " + std::to_string(p) + " points at a slot that is not ready");
    }
  }
  auto expect = [&](const char* what, uint64_t have, uint64_t want) {
    if (have != want)
      fail(std::string(what) + " is " + std::to_string(have) + ", entries say " + std::to_string(want));
  };
  expect("used_bytes", h->used_bytes, used_bytes);
  expect("used_units", h->used_units, used_units);
  expect("items", h->items, items);
  expect("live buckets", live_buckets, items);
  expect("writing", h->writing, writing);
  expect("retired", h->retired, retired);
  expect("tombstones", h->tombstones, tombs);
  expect("free slots", h->free_top, n - items - writing - retired);
  return problems;
}

}  // namespace stratacache
