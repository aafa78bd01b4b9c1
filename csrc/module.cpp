// Python entry point of stratacache._C.
//
// The tensor ops live in the torch.ops.stratacache namespace (see ops.cpp for
// the single TORCH_LIBRARY block); importing this module loads them. Stateful
// native objects that are not tensor ops (the shared-region index) are bound
// here with pybind11.
#include <torch/extension.h>

#include "shared_region_bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "StrataCache native extension: KV transfer ops and the shared-region index";
  stratacache::bind_shared_region(m);
}
