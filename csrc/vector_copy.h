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

// vector_copy with non-temporal (streaming) stores, for a destination that is
// not read again soon: a tier's arena or shared region on a put. A regular
// store first reads each destination line it misses (read-for-ownership) and
// evicts cached data to hold it; a streaming store does neither. Measured on
// the dev box's AMD EPYC, 1 MiB objects copied into a 256 MiB arena on one
// thread: 80-90 us streaming against 120-135 us with regular stores or memcpy
// (benchmarks/RESULTS.md, "CPU and disk tiers"). Ends with a store fence, so
// the bytes are visible to other threads and processes before anything this
// thread stores afterwards (a tier publishes the object after the copy).
void stream_copy(uint8_t* dst, const uint8_t* src, size_t n);

}  // namespace stratacache
