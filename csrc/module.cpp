// Python entry point of stratacache._C.
//
// The tensor ops live in the torch.ops.stratacache namespace (see ops.cpp for
// the single TORCH_LIBRARY block); importing this module loads them. Stateful
// native objects that are not tensor ops (the shared-region index) and the
// disk tier's verified read and the CPU tier's byte copy are bound here with
// pybind11.
#include <torch/extension.h>

#include "shared_region_bindings.h"

namespace stratacache {
void bind_record_file(pybind11::module_& m);  // record_file_py.cpp
void bind_bytes(pybind11::module_& m);      // bytes_py.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "StrataCache native extension: KV transfer ops, the shared-region index, verified file reads, byte copies";
  stratacache::bind_shared_region(m);
  stratacache::bind_record_file(m);
  stratacache::bind_bytes(m);
}
