// The file (or DAX device) behind a shared region and the attach protocol:
// option checks, creation with file_mode (0600 by default) and O_NOFOLLOW,
// ownership and mode checks, reserving every byte with fallocate so that no
// access through the mapping can fault when the filesystem fills, header
// validation before anything is dereferenced (version, every geometry field,
// a checksum, the file size), mapping, NUMA binding, and the flock protocol
// that decides whether this process is alone (then it creates, re-creates or
// repairs the region) or joins others.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

#include "region_format.h"

namespace stratacache {

// Every failure to open, validate or use a region, with a message that names
// the region path and what is wrong.
class RegionError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RegionOptions {
  std::string path;
  uint64_t capacity = 0;          // bytes of the data area
  uint32_t max_objects = 65536;   // entries in the index
  uint32_t max_key_bytes = 512;   // longest key stored (keys are stored in full)
  uint32_t block_bytes = 4096;    // allocation unit; payloads are aligned to it
  int numa_node = -1;             // mbind the mapping to this node (-1: no binding)
  uint32_t file_mode = 0600;      // mode of a region file we create
  bool reset = false;             // drop every object at attach
  bool read_only = false;         // inspection: no lock, no writes, no counters
};

class RegionFile {
 public:
  // How this process came to the mapped region, told to attach's callback.
  enum class Attached {
    kCreated,  // alone; the region was (re-)created empty
    kAlone,    // alone; an existing region whose mutex was re-initialised: repair it
    kJoined,   // other processes are attached: check the derived state, do not trust it
  };

  // Checks the options (std::invalid_argument naming the bad one) and opens
  // or creates the file.
  explicit RegionFile(const RegionOptions& opts);
  ~RegionFile();
  RegionFile(const RegionFile&) = delete;
  RegionFile& operator=(const RegionFile&) = delete;

  // Validates and maps the region (creating it if needed). For a read-write
  // attach, ready(kind) runs once the region is mapped and before others may
  // attach (the exclusive flock is held when alone). A read-only attach only
  // validates and maps.
  void attach(const std::function<void(Attached)>& ready);

  // Checksum of the header's geometry fields (layout_version .. data_off).
  static uint64_t geometry_checksum(const RegionHeader& h);

  RegionHeader* header() const { return hdr_; }
  uint8_t* base() const { return static_cast<uint8_t*>(base_); }
  uint8_t* data() const { return data_; }
  size_t map_bytes() const { return map_bytes_; }
  const RegionOptions& options() const { return opts_; }
  const std::string& path() const { return opts_.path; }

 private:
  void check_options() const;
  void open_file();
  void map_region(uint64_t bytes);
  bool read_header(RegionHeader* h) const;
  uint64_t file_bytes() const;
  void ensure_backed(uint64_t total, bool alone);
  void init_header(const RegionLayout& l);
  void init_mutex();
  // Why a header that carries the magic cannot be trusted, or "" when it can.
  std::string header_problem(const RegionHeader& h, uint64_t file_bytes) const;
  std::string region_problem(const RegionHeader& h, uint64_t file_bytes, const RegionLayout& l) const;
  void bind_numa();

  RegionOptions opts_;
  int fd_ = -1;
  bool is_device_ = false;
  void* base_ = nullptr;
  size_t map_bytes_ = 0;
  RegionHeader* hdr_ = nullptr;
  uint8_t* data_ = nullptr;
};

}  // namespace stratacache
