// Torch-free CPU kernels of the KV transfer ops: plans (raw addresses and
// byte strides, already validated) and the copy loops over them.
//
// Kept free of torch headers so the C++ tests (csrc/tests) build them in
// seconds under AddressSanitizer/UBSan; kv_transfer_ops.cpp validates tensors
// into these plans and runs the loops on torch's thread pool.
//
// Flat layout of a block transfer: bytes [n_blocks, n_layers, page_bytes], so
// the chunk of blocks [c*chunk_blocks, (c+1)*chunk_blocks) is one contiguous
// byte range.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checksum.h"
#include "vector_copy.h"

namespace stratacache {

struct BlockPlan {
  int64_t n_blocks = 0;      // len(block_ids)
  int64_t n_layers = 0;      // L
  int64_t page_bytes = 0;    // P
  int64_t chunk_blocks = 0;  // 0: no checksums
  int64_t n_chunks = 0;
  int64_t num_blocks = 0;    // smallest block count over the layers
  std::vector<uint8_t*> layer_base;         // address of block 0 of layer l
  std::vector<int64_t> layer_block_stride;  // bytes between consecutive blocks of layer l
  // Bytes between consecutive blocks of the flat side; 0: n_layers * page_bytes
  // (contiguous). Larger for a layer slice [n, l0:l1, P] of a chunk payload,
  // which layer-wise loads copy one layer at a time (no checksums then).
  int64_t flat_row_bytes = 0;
  int64_t row_bytes() const { return flat_row_bytes ? flat_row_bytes : n_layers * page_bytes; }
  int64_t chunk_bytes() const { return chunk_blocks * n_layers * page_bytes; }
  int64_t chunk_len(int64_t c) const {
    return std::min(chunk_blocks, n_blocks - c * chunk_blocks) * n_layers * page_bytes;
  }
};

enum class Direction { kGather, kScatter };

// The device address through which a kernel may read or write the host bytes
// [p, p + nbytes) (unified virtual addressing), or null when it must not: unless
// the first and the last byte are both page-locked and map to one contiguous
// device range. An allocation that straddles a registered and an unregistered
// piece (or two registrations apart in device space) is then staged instead of
// faulting the CUDA context. `device_of(const void*)` returns one byte's device
// address, null when the byte is not page-locked (cudaPointerGetAttributes).
template <class DeviceOf>
uint8_t* uva_range_of(const uint8_t* p, int64_t nbytes, DeviceOf&& device_of) {
  uint8_t* first = device_of(p);
  if (first == nullptr || nbytes <= 1) return first;
  uint8_t* last = device_of(p + nbytes - 1);
  return last == first + (nbytes - 1) ? first : nullptr;
}

// Pages are copied in segments of at most this many bytes (a multiple of 8,
// so a segment boundary is a checksum word boundary) so that a few large
// pages still spread over all threads.
constexpr int64_t kSegmentBytes = int64_t{1} << 18;

// Copies every (block, layer) page between the layers and `flat` (ids must be
// in range). With `with_sums` (needs page_bytes % 8 == 0, chunk_blocks > 0 and
// a contiguous flat side) returns each chunk's checksum word-term sum,
// computed in the copy loop.
// `parallel_for(begin, end, grain, fn(b, e))` runs the work, e.g. at::parallel_for.
template <class ParallelFor>
std::vector<uint64_t> copy_pages(const BlockPlan& p, const int64_t* ids, uint8_t* flat, Direction dir,
                                 bool with_sums, ParallelFor&& parallel_for) {
  const int64_t P = p.page_bytes, L = p.n_layers;
  const int64_t segs = std::max<int64_t>((P + kSegmentBytes - 1) / kSegmentBytes, 1);
  const int64_t items = p.n_blocks * L * segs;
  std::vector<uint64_t> item_sums(with_sums ? items : 0, 0);
  // About 1 MiB of copying per task keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(std::min(P, kSegmentBytes), 1));
  parallel_for(int64_t{0}, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t page = it / segs, seg = it % segs;
      const int64_t i = page / L, l = page % L;
      const int64_t off = seg * kSegmentBytes;
      const size_t len = static_cast<size_t>(std::min(kSegmentBytes, P - off));
      uint8_t* paged = p.layer_base[l] + ids[i] * p.layer_block_stride[l] + off;
      uint8_t* linear = flat + i * p.row_bytes() + l * P + off;
      uint8_t* dst = dir == Direction::kGather ? linear : paged;
      const uint8_t* src = dir == Direction::kGather ? paged : linear;
      if (with_sums) {
        const int64_t chunk_start = (i / p.chunk_blocks) * p.chunk_bytes();
        const uint64_t first_word = static_cast<uint64_t>(page * P + off - chunk_start) / 8;
        item_sums[it] = checksum::copy_sum_range(dst, src, len, first_word);
      } else {
        vector_copy(dst, src, len);
      }
    }
  });
  std::vector<uint64_t> chunk_sums(with_sums ? p.n_chunks : 0, 0);
  const int64_t per_block = L * segs;
  for (int64_t it = 0; with_sums && it < items; ++it) chunk_sums[(it / per_block) / p.chunk_blocks] += item_sums[it];
  return chunk_sums;
}

// checksum64 of each chunk of `flat` (a separate pass: used when pages are not
// a multiple of 8 bytes and so would split checksum words).
template <class ParallelFor>
std::vector<uint64_t> chunk_checksums_of(const BlockPlan& p, const uint8_t* flat, ParallelFor&& parallel_for) {
  std::vector<uint64_t> v(p.n_chunks);
  parallel_for(int64_t{0}, p.n_chunks, int64_t{1}, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const size_t len = static_cast<size_t>(p.chunk_len(c));
      v[c] = checksum::finalize(checksum::sum_range(flat + c * p.chunk_bytes(), len, 0), len);
    }
  });
  return v;
}

}  // namespace stratacache
