// Python bindings of the disk tier's record reads and writes (record_file.h).
#include <torch/extension.h>

#include "record_file.h"
#include "torch_parallel.h"

namespace stratacache {
namespace {

void check_dest(const at::Tensor& dest, const char* fn) {
  TORCH_CHECK(dest.device().is_cpu() && dest.is_contiguous() && dest.scalar_type() == at::kByte, fn,
              ": dest must be a contiguous CPU uint8 tensor, got ", dest.scalar_type(), " on ", dest.device());
}

}  // namespace

void bind_record_file(pybind11::module_& m) {
  m.def(
      "read_record",
      [](const std::string& path, const pybind11::bytes& head, const at::Tensor& dest, int dir_fd) {
        check_dest(dest, "read_record");
        const std::string h = head;  // copied: the GIL is released below
        record_file::RecordRead r;
        {
          pybind11::gil_scoped_release release;
          r = record_file::read_record(path.c_str(), reinterpret_cast<const uint8_t*>(h.data()), h.size(),
                                     static_cast<uint8_t*>(dest.data_ptr()), static_cast<size_t>(dest.numel()),
                                     TorchParallel{}, dir_fd);
        }
        return pybind11::make_tuple(static_cast<int>(r.status), r.error, r.payload.checksum, r.payload.bytes_read);
      },
      pybind11::arg("path"), pybind11::arg("head"), pybind11::arg("dest"), pybind11::arg("dir_fd") = AT_FDCWD,
      "Read a stored record (GIL released): the file at `path` (relative to `dir_fd`, a symbolic\n"
      "link refused) must start with `head` and hold\n"
      "exactly dest.numel() more bytes, which are read into `dest` and checksummed. Returns (status,\n"
      "errno, checksum64, payload bytes read); status 0 ok, 1 open failed, 2 header differs,\n"
      "3 size differs, 4 read failed.");
  m.def(
      "write_record",
      [](const std::string& tmp, const std::string& final_path, const pybind11::bytes& head, const at::Tensor& payload,
         int dir_fd) {
        TORCH_CHECK_VALUE(payload.device().is_cpu() && payload.is_contiguous(),
                          "write_record: payload must be a contiguous CPU tensor");
        const std::string h = head;  // copied: the GIL is released below
        pybind11::gil_scoped_release release;
        return record_file::write_record(tmp.c_str(), final_path.c_str(), reinterpret_cast<const uint8_t*>(h.data()),
                                         h.size(), static_cast<const uint8_t*>(payload.data_ptr()),
                                         static_cast<size_t>(payload.nbytes()), dir_fd);
      },
      pybind11::arg("tmp"), pybind11::arg("final_path"), pybind11::arg("head"), pybind11::arg("payload"),
      pybind11::arg("dir_fd") = AT_FDCWD,
      "Write head + payload to a new file `tmp` (0600, O_EXCL, O_NOFOLLOW) and rename it to `final_path`,\n"
      "both relative to `dir_fd` (GIL released). Returns 0 or the errno of the failed step; `tmp` is removed on failure.");
}

}  // namespace stratacache
