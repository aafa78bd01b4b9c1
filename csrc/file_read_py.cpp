// Python binding of the disk tier's verified read (file_read.h).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "file_read.h"

namespace stratacache {

void bind_file_read(pybind11::module_& m) {
  m.def(
      "read_and_checksum",
      [](int fd, int64_t offset, const at::Tensor& dest) {
        TORCH_CHECK(dest.device().is_cpu() && dest.is_contiguous() && dest.scalar_type() == at::kByte,
                    "read_and_checksum: dest must be a contiguous CPU uint8 tensor, got ", dest.scalar_type(),
                    " on ", dest.device());
        TORCH_CHECK(fd >= 0 && offset >= 0, "read_and_checksum: bad fd ", fd, " or offset ", offset);
        file_read::ReadResult r;
        {
          pybind11::gil_scoped_release release;
          r = file_read::read_and_checksum(
              fd, static_cast<uint64_t>(offset), static_cast<uint8_t*>(dest.data_ptr()),
              static_cast<size_t>(dest.numel()),
              [](int64_t b, int64_t e, int64_t grain, const auto& fn) { at::parallel_for(b, e, grain, fn); });
        }
        return pybind11::make_tuple(r.checksum, r.bytes_read, r.error);
      },
      pybind11::arg("fd"), pybind11::arg("offset"), pybind11::arg("dest"),
      "Read dest.numel() bytes at `offset` of file descriptor `fd` into `dest` (GIL released) and\n"
      "return (checksum64 as unsigned int, bytes read, errno or 0). Fewer bytes than asked means the\n"
      "file ended early; the checksum is then meaningless.");
}

}  // namespace stratacache
