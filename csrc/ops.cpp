// The one TORCH_LIBRARY block declaring every stratacache op schema.
// (Owned by the native-ops work; placeholder so the package builds.)
#include <torch/library.h>

TORCH_LIBRARY(stratacache, m) {}
