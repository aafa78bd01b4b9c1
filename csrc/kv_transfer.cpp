// CPU kernels of the block- and token-granular KV transfer ops, and the
// argument validation shared with the CUDA kernels.
//
// Destination layout of a block gather: uint8 [n_blocks, n_layers, page_bytes],
// so the chunk of blocks [c*chunk_blocks, (c+1)*chunk_blocks) is one
// contiguous byte range that a tier stores as one object. Each page copy is one
// large memcpy-sized run; pages are split into segments so that a few large
// pages still spread over all threads.
#include "kv_transfer.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checksum.h"

namespace stratacache {

void check_contiguous_bytes(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(), " for shape ", t.sizes(), ")");
}

namespace {

void check_index_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
}

void check_flat(const at::Tensor& flat, const char* name, int64_t need_bytes, const char* op) {
  TORCH_CHECK(flat.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(flat.scalar_type() == at::kByte, op, ": ", name, " must be uint8, got ", flat.scalar_type());
  TORCH_CHECK(flat.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", flat.strides());
  TORCH_CHECK(static_cast<int64_t>(flat.nbytes()) >= need_bytes, op, ": ", name, " is too small: ", flat.nbytes(),
              " bytes, needs ", need_bytes);
}

// Every layer on one device; the flat buffer there too, or on the host when
// the layers are on an accelerator (UVA / staging transfers).
void check_devices(at::TensorList layers, const at::Tensor& flat, const char* flat_name, const char* op) {
  auto dev = layers[0].device();
  for (size_t l = 0; l < layers.size(); ++l) {
    TORCH_CHECK(layers[l].device() == dev, op, ": layers[", l, "] is on ", layers[l].device(), " but layers[0] is on ",
                dev);
  }
  TORCH_CHECK(flat.device() == dev || flat.device().is_cpu(), op, ": ", flat_name, " is on ", flat.device(),
              " but the layers are on ", dev);
}

}  // namespace

BlockPlan plan_blocks(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& flat,
                      const char* flat_name, int64_t chunk_blocks, const char* op) {
  TORCH_CHECK(!layers.empty(), op, ": layers must hold at least one tensor");
  check_index_tensor(block_ids, "block_ids", op);
  TORCH_CHECK(chunk_blocks >= 0, op, ": chunk_blocks must be >= 0, got ", chunk_blocks);
  BlockPlan p;
  p.n_layers = static_cast<int64_t>(layers.size());
  p.n_blocks = block_ids.size(0);
  p.chunk_blocks = chunk_blocks;
  p.n_chunks = chunk_blocks ? (p.n_blocks + chunk_blocks - 1) / chunk_blocks : 0;
  p.num_blocks = INT64_MAX;
  const auto& first = layers[0];
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& t = layers[l];
    TORCH_CHECK(t.defined(), op, ": layers[", l, "] is None");
    TORCH_CHECK(t.dim() >= 1, op, ": layers[", l, "] must have a block dimension, got a 0-d tensor");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": layers[", l, "] has dtype ", t.scalar_type(),
                " but layers[0] has ", first.scalar_type());
    int64_t page = static_cast<int64_t>(t.element_size());
    for (int64_t d = 1; d < t.dim(); ++d) page *= t.size(d);
    if (l == 0) p.page_bytes = page;
    TORCH_CHECK(page == p.page_bytes, op, ": layers[", l, "] has ", page, "-byte pages but layers[0] has ",
                p.page_bytes, "-byte pages (mismatched page sizes)");
    // A page (one block of a layer) must be one contiguous run of bytes.
    int64_t expect = 1;
    for (int64_t d = t.dim() - 1; d >= 1; --d) {
      TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expect, op, ": layers[", l,
                  "] has non-contiguous pages (shape ", t.sizes(), ", strides ", t.strides(),
                  "); each block's page must be contiguous");
      expect *= t.size(d);
    }
    TORCH_CHECK(t.size(0) <= 1 || t.stride(0) > 0, op, ": layers[", l, "] has a zero block stride");
    p.num_blocks = std::min<int64_t>(p.num_blocks, t.size(0));
    p.layer_base.push_back(byte_ptr(t));
    p.layer_block_stride.push_back(t.stride(0) * static_cast<int64_t>(t.element_size()));
  }
  check_devices(layers, flat, flat_name, op);
  TORCH_CHECK(block_ids.device() == layers[0].device() || block_ids.device().is_cpu(), op,
              ": block_ids is on ", block_ids.device(), " but the layers are on ", layers[0].device());
  check_flat(flat, flat_name, p.n_blocks * p.n_layers * p.page_bytes, op);
  return p;
}

std::vector<int64_t> host_block_ids(const at::Tensor& block_ids, int64_t num_blocks) {
  auto ids = block_ids.to(at::kCPU).contiguous();
  const int64_t* v = ids.data_ptr<int64_t>();
  std::vector<int64_t> out(v, v + ids.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= 0 && out[i] < num_blocks, "block_ids[", i, "] = ", out[i],
                " is out of range for layers with ", num_blocks, " blocks");
  }
  return out;
}

TokenPlan plan_tokens(at::TensorList layers, const at::Tensor& slot_mapping, const at::Tensor& flat,
                      const char* flat_name, const char* op) {
  TORCH_CHECK(!layers.empty(), op, ": layers must hold at least one tensor");
  check_index_tensor(slot_mapping, "slot_mapping", op);
  TokenPlan p;
  p.n_tokens = slot_mapping.size(0);
  p.n_layers = static_cast<int64_t>(layers.size());
  const auto& first = layers[0];
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& t = layers[l];
    TORCH_CHECK(t.defined(), op, ": layers[", l, "] is None");
    TORCH_CHECK(t.dim() == 5, op, ": layers[", l, "] must be a [KV, blocks, block_size, heads, head_dim] view, got ",
                t.dim(), " dims (use the layout argument of stratacache.ops.", op, ")");
    TORCH_CHECK(t.sizes() == first.sizes(), op, ": layers[", l, "] has shape ", t.sizes(), " but layers[0] has ",
                first.sizes());
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": layers[", l, "] has dtype ", t.scalar_type(),
                " but layers[0] has ", first.scalar_type());
    TORCH_CHECK(t.size(4) <= 1 || t.stride(4) == 1, op, ": layers[", l,
                "] must have a contiguous head_dim (stride 1), got strides ", t.strides());
    int64_t es = static_cast<int64_t>(t.element_size());
    p.layer_base.push_back(byte_ptr(t));
    p.s_kv.push_back(t.stride(0) * es);
    p.s_block.push_back(t.stride(1) * es);
    p.s_tok.push_back(t.stride(2) * es);
    p.s_head.push_back(t.stride(3) * es);
  }
  p.kv = first.size(0);
  p.num_blocks = first.size(1);
  p.block_size = first.size(2);
  p.heads = first.size(3);
  p.row_bytes = first.size(4) * static_cast<int64_t>(first.element_size());
  p.token_bytes = p.kv * p.heads * p.row_bytes;
  check_devices(layers, flat, flat_name, op);
  TORCH_CHECK(slot_mapping.device() == layers[0].device() || slot_mapping.device().is_cpu(), op,
              ": slot_mapping is on ", slot_mapping.device(), " but the layers are on ", layers[0].device());
  check_flat(flat, flat_name, p.n_tokens * p.n_layers * p.token_bytes, op);
  return p;
}

std::vector<int64_t> host_slots(const at::Tensor& slot_mapping, int64_t num_slots) {
  auto s = slot_mapping.to(at::kCPU).contiguous();
  const int64_t* v = s.data_ptr<int64_t>();
  std::vector<int64_t> out(v, v + s.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= -1 && out[i] < num_slots, "slot_mapping[", i, "] = ", out[i],
                " is out of range for layers with ", num_slots, " slots (-1 marks a skipped token)");
  }
  return out;
}

namespace {

// Pages are copied in segments of at most this many bytes (a multiple of 8,
// so a segment boundary is a checksum word boundary).
constexpr int64_t kSegmentBytes = int64_t{1} << 18;

enum class Direction { kGather, kScatter };

// Copies every (block, layer) page between the layers and the flat buffer
// and, when chunk_blocks > 0, returns each chunk's word-term sum.
std::vector<uint64_t> copy_pages(const BlockPlan& p, const std::vector<int64_t>& ids, uint8_t* flat,
                                 Direction dir, bool with_sums) {
  const int64_t P = p.page_bytes, L = p.n_layers;
  const int64_t segs = std::max<int64_t>((P + kSegmentBytes - 1) / kSegmentBytes, 1);
  const int64_t items = p.n_blocks * L * segs;
  std::vector<uint64_t> item_sums(with_sums ? items : 0, 0);
  // About 1 MiB of copying per task keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(std::min(P, kSegmentBytes), 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      int64_t page = it / segs, seg = it % segs;
      int64_t i = page / L, l = page % L;
      int64_t off = seg * kSegmentBytes;
      size_t len = static_cast<size_t>(std::min(kSegmentBytes, P - off));
      uint8_t* paged = p.layer_base[l] + ids[i] * p.layer_block_stride[l] + off;
      uint8_t* linear = flat + page * P + off;
      uint8_t* dst = dir == Direction::kGather ? linear : paged;
      const uint8_t* src = dir == Direction::kGather ? paged : linear;
      if (with_sums) {
        int64_t chunk_start = (i / p.chunk_blocks) * p.chunk_blocks * L * P;
        uint64_t first_word = static_cast<uint64_t>(page * P + off - chunk_start) / 8;
        item_sums[it] = checksum::copy_sum_range(dst, src, len, first_word);
      } else {
        std::memcpy(dst, src, len);
      }
    }
  });
  std::vector<uint64_t> chunk_sums(with_sums ? p.n_chunks : 0, 0);
  const int64_t per_block = L * segs;
  for (int64_t it = 0; with_sums && it < items; ++it) chunk_sums[(it / per_block) / p.chunk_blocks] += item_sums[it];
  return chunk_sums;
}

// Final checksums of every chunk of the flat buffer (an extra pass, used only
// when pages are not a multiple of 8 bytes and so split checksum words).
std::vector<uint64_t> chunk_values_by_pass(const BlockPlan& p, const uint8_t* flat) {
  std::vector<uint64_t> v(p.n_chunks);
  at::parallel_for(0, p.n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      int64_t blocks = std::min(p.chunk_blocks, p.n_blocks - c * p.chunk_blocks);
      size_t len = static_cast<size_t>(blocks * p.n_layers * p.page_bytes);
      v[c] = checksum::checksum_bytes(flat + c * p.chunk_bytes(), len);
    }
  });
  return v;
}

uint64_t chunk_len(const BlockPlan& p, int64_t c) {
  return static_cast<uint64_t>(std::min(p.chunk_blocks, p.n_blocks - c * p.chunk_blocks) * p.n_layers * p.page_bytes);
}

at::Tensor gather_blocks_cpu(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& out,
                             int64_t chunk_blocks) {
  auto p = plan_blocks(layers, block_ids, out, "out", chunk_blocks, "gather_blocks");
  TORCH_CHECK(layers[0].device().is_cpu(), "gather_blocks: layers are on ", layers[0].device(),
              "; the CPU kernel needs CPU layers");
  auto ids = host_block_ids(block_ids, p.num_blocks);
  auto result = at::empty({p.n_chunks}, block_ids.options().dtype(at::kLong).device(at::kCPU));
  bool fused = chunk_blocks > 0 && p.page_bytes % 8 == 0;
  auto sums = copy_pages(p, ids, byte_ptr(out), Direction::kGather, fused);
  if (chunk_blocks > 0) {
    auto* r = result.data_ptr<int64_t>();
    if (fused) {
      for (int64_t c = 0; c < p.n_chunks; ++c) r[c] = static_cast<int64_t>(checksum::finalize(sums[c], chunk_len(p, c)));
    } else {
      auto v = chunk_values_by_pass(p, byte_ptr(out));
      for (int64_t c = 0; c < p.n_chunks; ++c) r[c] = static_cast<int64_t>(v[c]);
    }
  }
  return result;
}

at::Tensor scatter_blocks_cpu(const at::Tensor& src, const at::Tensor& block_ids, at::TensorList layers,
                              int64_t chunk_blocks, const std::optional<at::Tensor>& expected) {
  auto p = plan_blocks(layers, block_ids, src, "src", chunk_blocks, "scatter_blocks");
  TORCH_CHECK(layers[0].device().is_cpu(), "scatter_blocks: layers are on ", layers[0].device(),
              "; the CPU kernel needs CPU layers");
  bool verify = expected.has_value() && expected->defined();
  if (verify) {
    TORCH_CHECK(chunk_blocks > 0, "scatter_blocks: expected needs chunk_blocks > 0");
    check_index_tensor(*expected, "expected", "scatter_blocks");
    TORCH_CHECK(expected->size(0) == p.n_chunks, "scatter_blocks: expected has ", expected->size(0),
                " checksums but there are ", p.n_chunks, " chunks");
    TORCH_CHECK(expected->device().is_cpu(), "scatter_blocks: expected must be on the CPU, got ", expected->device());
  }
  auto ids = host_block_ids(block_ids, p.num_blocks);
  auto ok = at::empty({verify ? p.n_chunks : 0}, block_ids.options().dtype(at::kBool).device(at::kCPU));
  bool fused = verify && p.page_bytes % 8 == 0;
  std::vector<uint64_t> values;
  if (verify && !fused) values = chunk_values_by_pass(p, byte_ptr(src));
  auto sums = copy_pages(p, ids, byte_ptr(src), Direction::kScatter, fused);
  if (verify) {
    auto exp = expected->contiguous();
    const int64_t* e = exp.data_ptr<int64_t>();
    bool* r = ok.data_ptr<bool>();
    for (int64_t c = 0; c < p.n_chunks; ++c) {
      uint64_t v = fused ? checksum::finalize(sums[c], chunk_len(p, c)) : values[c];
      r[c] = static_cast<int64_t>(v) == e[c];
    }
  }
  return ok;
}

// Copies each token's KV x heads rows between the layers and the flat buffer.
void copy_tokens(const TokenPlan& p, const std::vector<int64_t>& slots, uint8_t* flat, Direction dir) {
  const int64_t T = p.n_tokens, L = p.n_layers;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(p.token_bytes, 1));
  at::parallel_for(0, T * L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      int64_t t = it / L, l = it % L;
      int64_t slot = slots[t];
      if (slot < 0) continue;
      uint8_t* tok = p.layer_base[l] + (slot / p.block_size) * p.s_block[l] + (slot % p.block_size) * p.s_tok[l];
      uint8_t* linear = flat + it * p.token_bytes;
      // Heads are one run when they are adjacent (NHD order).
      bool merged = p.heads == 1 || p.s_head[l] == p.row_bytes;
      int64_t runs = merged ? 1 : p.heads, run_bytes = merged ? p.heads * p.row_bytes : p.row_bytes;
      for (int64_t kv = 0; kv < p.kv; ++kv) {
        for (int64_t h = 0; h < runs; ++h) {
          uint8_t* paged = tok + kv * p.s_kv[l] + h * p.s_head[l];
          uint8_t* lin = linear + (kv * runs + h) * run_bytes;
          if (dir == Direction::kGather) {
            std::memcpy(lin, paged, run_bytes);
          } else {
            std::memcpy(paged, lin, run_bytes);
          }
        }
      }
    }
  });
}

void gather_tokens_cpu(at::TensorList layers, const at::Tensor& slot_mapping, const at::Tensor& out) {
  auto p = plan_tokens(layers, slot_mapping, out, "out", "gather_tokens");
  TORCH_CHECK(layers[0].device().is_cpu(), "gather_tokens: the CPU kernel needs CPU layers");
  copy_tokens(p, host_slots(slot_mapping, p.num_blocks * p.block_size), byte_ptr(out), Direction::kGather);
}

void scatter_tokens_cpu(const at::Tensor& src, const at::Tensor& slot_mapping, at::TensorList layers) {
  auto p = plan_tokens(layers, slot_mapping, src, "src", "scatter_tokens");
  TORCH_CHECK(layers[0].device().is_cpu(), "scatter_tokens: the CPU kernel needs CPU layers");
  copy_tokens(p, host_slots(slot_mapping, p.num_blocks * p.block_size), byte_ptr(src), Direction::kScatter);
}

}  // namespace

TORCH_LIBRARY_IMPL(stratacache, CPU, m) {
  m.impl("gather_blocks", &gather_blocks_cpu);
  m.impl("scatter_blocks", &scatter_blocks_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
}

}  // namespace stratacache
