// Python entry point of stratacache._C.
//
// The tensor ops live in the torch.ops.stratacache namespace (see ops.cpp for
// the single TORCH_LIBRARY block); importing this module loads them. Stateful
// native objects that are not tensor ops (the shared-region index) and the
// disk tier's verified read are bound here with pybind11.
#include <torch/extension.h>

#include "shared_region_bindings.h"

namespace stratacache {
void bind_file_read(pybind11::module_& m);  // file_read_py.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "StrataCache native extension: KV transfer ops, the shared-region index, verified file reads";
  stratacache::bind_shared_region(m);
  stratacache::bind_file_read(m);
}
