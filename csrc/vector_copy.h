// Byte copies for page-sized ranges (KiB to MiB) as one vector loop.
//
// glibc's memcpy copies ranges of this size with `rep movsb`, which on the
// dev box's Xeon moves random 64 KiB pages at 8.3 GB/s where a plain 32-byte
// load/store loop reaches 9.6 GB/s (a contiguous copy: 10.1 GB/s, the same
// loop torch's copy_ runs); see benchmarks/RESULTS.md, "Transfer ops".
#pragma once

#include <cstddef>
#include <cstdint>

namespace stratacache {

// memcpy(dst, src, n) for non-overlapping ranges: an AVX2 loop where the CPU
// has AVX2 (chosen at load time), memcpy elsewhere and for short ranges.
void vector_copy(uint8_t* dst, const uint8_t* src, size_t n);

}  // namespace stratacache
