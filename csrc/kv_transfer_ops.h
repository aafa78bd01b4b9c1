// Tensor validation for the KV transfer ops, shared by the CPU and CUDA
// kernels: every check raises a Python exception (ValueError, TypeError or
// IndexError) naming the offending argument, before any byte is written.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "kv_transfer.h"

namespace stratacache {

inline uint8_t* byte_ptr(const at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

// `t` must be contiguous (its bytes are read as one flat run).
void check_contiguous_bytes(const at::Tensor& t, const char* name);

// transfer must name a host path: "auto", "uva" or "staging".
void check_transfer(c10::string_view transfer, const char* op);

// Validates a block gather/scatter. `flat` is `out` (gather) or `src`
// (scatter), named `flat_name`; it may live on the layers' device or, for
// accelerator layers, on the host.
BlockPlan plan_blocks(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& flat,
                      const char* flat_name, int64_t chunk_blocks, const char* op);

// Block ids as host values (copied from the device when needed), each checked
// against the layers' block count.
std::vector<int64_t> host_block_ids(const at::Tensor& block_ids, int64_t num_blocks);

// An int64 1-D argument (block_ids, expected).
void check_index_tensor(const at::Tensor& t, const char* name, const char* op);

}  // namespace stratacache
