// Python binding of the bounds-checked byte copy the CPU tier uses.
//
// A tier object is a byte range of a big arena; copying it with
// arena.narrow(...).copy_(...) costs two tensor dispatches (~10 us) per
// object, which is most of a small object's cost. This is one call, with the
// GIL released while the bytes move.
#include <torch/extension.h>

#include "torch_parallel.h"

namespace stratacache {

void bind_bytes(pybind11::module_& m) {
  m.def(
      "copy_bytes",
      [](const at::Tensor& dst, int64_t dst_offset, const at::Tensor& src, int64_t src_offset, int64_t nbytes,
         bool stream) {
        for (const auto* t : {&dst, &src}) {
          TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(),
                            "copy_bytes: dst and src must be contiguous CPU tensors");
        }
        const int64_t dst_bytes = static_cast<int64_t>(dst.nbytes());
        const int64_t src_bytes = static_cast<int64_t>(src.nbytes());
        TORCH_CHECK_VALUE(nbytes >= 0 && dst_offset >= 0 && src_offset >= 0 && dst_offset <= dst_bytes - nbytes &&
                              src_offset <= src_bytes - nbytes,
                          "copy_bytes: ", nbytes, " bytes at dst_offset ", dst_offset, " / src_offset ", src_offset,
                          " do not fit dst (", dst_bytes, " bytes) and src (", src_bytes, " bytes)");
        auto* to = static_cast<uint8_t*>(dst.data_ptr()) + dst_offset;
        const auto* from = static_cast<const uint8_t*>(src.data_ptr()) + src_offset;
        pybind11::gil_scoped_release release;
        parallel_copy(to, from, static_cast<uint64_t>(nbytes), stream);
      },
      pybind11::arg("dst"), pybind11::arg("dst_offset"), pybind11::arg("src"), pybind11::arg("src_offset"),
      pybind11::arg("nbytes"), pybind11::arg("stream") = false,
      "Copy `nbytes` bytes from byte `src_offset` of `src` to byte `dst_offset` of `dst` (GIL released;\n"
      "ValueError when a range falls outside its tensor). The ranges must not overlap. `stream`\n"
      "writes with non-temporal stores: for a destination not read again soon (a tier's put).");
}

}  // namespace stratacache
