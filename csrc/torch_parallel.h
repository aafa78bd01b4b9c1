// Runs the torch-free kernels on torch's intra-op thread pool.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "vector_copy.h"

namespace stratacache {

// at::parallel_for with the `parallel_for(begin, end, grain, fn(b, e))`
// signature the kernels in kv_transfer.h, checksum.h and record_file.h take.
struct TorchParallel {
  template <class Fn>
  void operator()(int64_t begin, int64_t end, int64_t grain, const Fn& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
};

// vector_copy (stream_copy when `stream`) spread over the intra-op threads in
// 256 KiB pieces, like Tensor.copy_. Each piece's thread fences its own
// streaming stores before parallel_for joins, so the bytes are visible once
// this returns.
inline void parallel_copy(uint8_t* dst, const uint8_t* src, uint64_t n, bool stream = false) {
  at::parallel_for(0, int64_t(n), int64_t(1) << 18, [&](int64_t begin, int64_t end) {
    if (stream)
      stream_copy(dst + begin, src + begin, size_t(end - begin));
    else
      vector_copy(dst + begin, src + begin, size_t(end - begin));
  });
}

}  // namespace stratacache
