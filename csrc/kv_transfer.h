// Argument validation and copy plans shared by the CPU and CUDA KV transfer
// kernels. Every check raises a c10::Error (a Python exception) that names
// the offending argument, before any byte is written.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace stratacache {

inline uint8_t* byte_ptr(const at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

// `t` must be contiguous (its bytes are read as one flat run).
void check_contiguous_bytes(const at::Tensor& t, const char* name);

// A block-granular transfer between L paged layers and a flat [n, L, P] buffer.
struct BlockPlan {
  int64_t n_blocks = 0;       // len(block_ids)
  int64_t n_layers = 0;       // L
  int64_t page_bytes = 0;     // P
  int64_t chunk_blocks = 0;   // 0: no checksums
  int64_t n_chunks = 0;
  std::vector<uint8_t*> layer_base;       // layers[l].data_ptr()
  std::vector<int64_t> layer_block_stride;  // bytes between consecutive blocks of layer l
  int64_t num_blocks = 0;    // smallest size(0) over the layers
  int64_t chunk_bytes() const { return chunk_blocks * n_layers * page_bytes; }
};

// Validates gather/scatter arguments. `flat` is `out` (gather) or `src`
// (scatter), named `flat_name`; `allow_flat_device` is the device kind the
// flat buffer may live on besides the layers' device (CPU for the CUDA
// kernels, which read pinned host memory).
BlockPlan plan_blocks(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& flat,
                      const char* flat_name, int64_t chunk_blocks, const char* op);

// Block ids as host int64 values (copied from the device when needed), each
// checked against the layers' block count.
std::vector<int64_t> host_block_ids(const at::Tensor& block_ids, int64_t num_blocks);

// A token-granular transfer. Each layer is a [KV, B, N, H, D] element view
// (D contiguous); a token's bytes in the flat buffer are its (kv, h, d)
// elements in that order.
struct TokenPlan {
  int64_t n_tokens = 0, n_layers = 0;
  int64_t kv = 0, num_blocks = 0, block_size = 0, heads = 0;
  int64_t row_bytes = 0;      // D * element size: one contiguous run
  int64_t token_bytes = 0;    // kv * heads * row_bytes
  std::vector<uint8_t*> layer_base;
  // Byte strides of the KV, block, token-in-block and head dims, per layer.
  std::vector<int64_t> s_kv, s_block, s_tok, s_head;
};

TokenPlan plan_tokens(at::TensorList layers, const at::Tensor& slot_mapping, const at::Tensor& flat,
                      const char* flat_name, const char* op);

// Slots as host values; -1 marks a padding token that is skipped.
std::vector<int64_t> host_slots(const at::Tensor& slot_mapping, int64_t num_slots);

}  // namespace stratacache
