#pragma once
#include <torch/extension.h>

namespace stratacache {
// Registers the shared-region classes on the extension module.
void bind_shared_region(pybind11::module_& m);
}  // namespace stratacache
