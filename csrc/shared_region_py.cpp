// Placeholder until the shared-region index lands (owned by the shared-region work).
#include "shared_region_bindings.h"

namespace stratacache {
void bind_shared_region(pybind11::module_& m) { (void)m; }
}  // namespace stratacache
