// CPU ops (checksums and block transfers) and the tensor validation
// shared with the CUDA kernels. The copy loops are in kv_transfer.h and run
// on torch's intra-op thread pool.
#include "kv_transfer_ops.h"

#include <torch/library.h>

#include <algorithm>

#include "torch_parallel.h"

namespace stratacache {

void check_contiguous_bytes(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (got strides ", t.strides(), " for shape ",
                    t.sizes(), ")");
}

void check_index_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
}

namespace {

void check_flat(const at::Tensor& flat, const char* name, int64_t need_bytes, const char* op) {
  TORCH_CHECK_VALUE(flat.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_TYPE(flat.scalar_type() == at::kByte, op, ": ", name, " must be uint8, got ", flat.scalar_type());
  TORCH_CHECK_VALUE(flat.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", flat.strides());
  TORCH_CHECK_VALUE(static_cast<int64_t>(flat.nbytes()) >= need_bytes, op, ": ", name, " is too small: ", flat.nbytes(),
                    " bytes, needs ", need_bytes);
}

// The flat side of a block transfer: contiguous uint8 with room for [n, L, P],
// or a [n, L, P] uint8 view whose rows (blocks) lie further apart than L * P
// bytes, such as the slice [:, l0:l1] of a chunk payload. Returns the row
// stride in bytes.
int64_t check_block_flat(const at::Tensor& flat, const char* name, const BlockPlan& p, const char* op) {
  const int64_t row = p.n_layers * p.page_bytes;
  if (!flat.defined() || flat.is_contiguous() || flat.scalar_type() != at::kByte) {
    check_flat(flat, name, p.n_blocks * row, op);
    return row;
  }
  const bool rows = flat.dim() == 3 && flat.size(0) == p.n_blocks && flat.size(1) == p.n_layers &&
                    flat.size(2) == p.page_bytes && flat.stride(2) == 1 &&
                    (p.n_layers <= 1 || flat.stride(1) == p.page_bytes) && flat.stride(0) >= row;
  TORCH_CHECK_VALUE(rows, op, ": ", name, " must be contiguous, or a [", p.n_blocks, ", ", p.n_layers, ", ",
                    p.page_bytes, "] view with contiguous rows of pages; got shape ", flat.sizes(), ", strides ",
                    flat.strides());
  TORCH_CHECK_VALUE(p.chunk_blocks == 0, op, ": checksums (chunk_blocks > 0) need a contiguous ", name,
                    "; got strides ", flat.strides());
  return flat.stride(0);
}

// Every layer on one device; the flat buffer there too, or on the host when
// the layers are on an accelerator (UVA / staging transfers).
void check_devices(at::TensorList layers, const at::Tensor& flat, const char* flat_name, const char* op) {
  auto dev = layers[0].device();
  for (size_t l = 0; l < layers.size(); ++l) {
    TORCH_CHECK_VALUE(layers[l].device() == dev, op, ": layers[", l, "] is on ", layers[l].device(),
                      " but layers[0] is on ", dev);
  }
  TORCH_CHECK_VALUE(flat.device() == dev || flat.device().is_cpu(), op, ": ", flat_name, " is on ", flat.device(),
                    " but the layers are on ", dev);
}

}  // namespace

void check_transfer(c10::string_view transfer, const char* op) {
  TORCH_CHECK_VALUE(transfer == "auto" || transfer == "uva" || transfer == "staging", op,
                    ": transfer must be 'auto', 'uva' or 'staging', got '", transfer, "'");
}

BlockPlan plan_blocks(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& flat,
                      const char* flat_name, int64_t chunk_blocks, const char* op) {
  TORCH_CHECK_VALUE(!layers.empty(), op, ": layers must hold at least one tensor");
  check_index_tensor(block_ids, "block_ids", op);
  TORCH_CHECK_VALUE(chunk_blocks >= 0, op, ": chunk_blocks must be >= 0, got ", chunk_blocks);
  BlockPlan p;
  p.n_layers = static_cast<int64_t>(layers.size());
  p.n_blocks = block_ids.size(0);
  // A chunk longer than the transfer is the whole transfer (and keeps chunk byte sizes in range).
  p.chunk_blocks = chunk_blocks ? std::min<int64_t>(chunk_blocks, std::max<int64_t>(p.n_blocks, 1)) : 0;
  p.n_chunks = chunk_blocks ? checksum::chunk_count(p.n_blocks, p.chunk_blocks) : 0;
  p.num_blocks = INT64_MAX;
  const auto& first = layers[0];
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& t = layers[l];
    TORCH_CHECK_VALUE(t.defined(), op, ": layers[", l, "] is None");
    TORCH_CHECK_VALUE(t.dim() >= 1, op, ": layers[", l, "] must have a block dimension, got a 0-d tensor");
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": layers[", l, "] has dtype ", t.scalar_type(),
                     " but layers[0] has ", first.scalar_type());
    int64_t page = static_cast<int64_t>(t.element_size());
    for (int64_t d = 1; d < t.dim(); ++d) page *= t.size(d);
    if (l == 0) p.page_bytes = page;
    TORCH_CHECK_VALUE(page == p.page_bytes, op, ": layers[", l, "] has ", page, "-byte pages but layers[0] has ",
                      p.page_bytes, "-byte pages (mismatched page sizes)");
    // A page (one block of a layer) must be one contiguous run of bytes.
    int64_t expect = 1;
    for (int64_t d = t.dim() - 1; d >= 1; --d) {
      TORCH_CHECK_VALUE(t.size(d) == 1 || t.stride(d) == expect, op, ": layers[", l,
                        "] has non-contiguous pages (shape ", t.sizes(), ", strides ", t.strides(),
                        "); each block's page must be contiguous");
      expect *= t.size(d);
    }
    TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) > 0, op, ": layers[", l, "] has a zero block stride");
    p.num_blocks = std::min<int64_t>(p.num_blocks, t.size(0));
    p.layer_base.push_back(byte_ptr(t));
    p.layer_block_stride.push_back(t.stride(0) * static_cast<int64_t>(t.element_size()));
  }
  check_devices(layers, flat, flat_name, op);
  TORCH_CHECK_VALUE(block_ids.device() == layers[0].device() || block_ids.device().is_cpu(), op,
                    ": block_ids is on ", block_ids.device(), " but the layers are on ", layers[0].device());
  p.flat_row_bytes = check_block_flat(flat, flat_name, p, op);
  return p;
}

std::vector<int64_t> host_block_ids(const at::Tensor& block_ids, int64_t num_blocks) {
  auto host = block_ids.to(at::kCPU).contiguous();
  const int64_t* v = host.data_ptr<int64_t>();
  std::vector<int64_t> out(v, v + host.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK_INDEX(out[i] >= 0 && out[i] < num_blocks, "block_ids[", i, "] = ", out[i],
                      " is out of range for layers with ", num_blocks, " blocks");
  }
  return out;
}

namespace {

at::Tensor checksum64_cpu(const at::Tensor& data) {
  check_contiguous_bytes(data, "data");
  auto out = at::empty({}, data.options().dtype(at::kLong));
  out.fill_(static_cast<int64_t>(checksum::checksum_bytes(byte_ptr(data), data.nbytes(), TorchParallel{})));
  return out;
}

at::Tensor chunk_checksums_cpu(const at::Tensor& data, int64_t chunk_bytes) {
  check_contiguous_bytes(data, "data");
  TORCH_CHECK_VALUE(chunk_bytes > 0, "chunk_checksums: chunk_bytes must be positive, got ", chunk_bytes);
  int64_t nbytes = static_cast<int64_t>(data.nbytes());
  int64_t nchunks = checksum::chunk_count(nbytes, chunk_bytes);
  auto out = at::empty({nchunks}, data.options().dtype(at::kLong));
  auto* res = out.data_ptr<int64_t>();
  const uint8_t* p = byte_ptr(data);
  if (nchunks == 0) return out;
  if (nchunks == 1 || chunk_bytes >= int64_t{1} << 22) {
    // Few big chunks: parallelize inside each chunk.
    for (int64_t c = 0; c < nchunks; ++c) {
      int64_t off = c * chunk_bytes;
      size_t len = static_cast<size_t>(std::min(chunk_bytes, nbytes - off));
      res[c] = static_cast<int64_t>(checksum::checksum_bytes(p + off, len, TorchParallel{}));
    }
    return out;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t off = c * chunk_bytes;
      size_t len = static_cast<size_t>(std::min(chunk_bytes, nbytes - off));
      res[c] = static_cast<int64_t>(checksum::finalize(checksum::sum_range(p + off, len, 0), len));
    }
  });
  return out;
}

at::Tensor gather_blocks_cpu(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& out,
                             int64_t chunk_blocks, c10::string_view transfer) {
  check_transfer(transfer, "gather_blocks");
  auto p = plan_blocks(layers, block_ids, out, "out", chunk_blocks, "gather_blocks");
  TORCH_CHECK_VALUE(layers[0].device().is_cpu(), "gather_blocks: layers are on ", layers[0].device(),
                    "; the CPU kernel needs CPU layers");
  auto ids = host_block_ids(block_ids, p.num_blocks);
  auto result = at::empty({p.n_chunks}, block_ids.options().dtype(at::kLong).device(at::kCPU));
  bool fused = chunk_blocks > 0 && p.page_bytes % 8 == 0;
  auto sums = copy_pages(p, ids.data(), byte_ptr(out), Direction::kGather, fused, TorchParallel{});
  if (chunk_blocks > 0) {
    auto* r = result.data_ptr<int64_t>();
    if (fused) {
      for (int64_t c = 0; c < p.n_chunks; ++c) r[c] = static_cast<int64_t>(checksum::finalize(sums[c], p.chunk_len(c)));
    } else {
      auto v = chunk_checksums_of(p, byte_ptr(out), TorchParallel{});
      for (int64_t c = 0; c < p.n_chunks; ++c) r[c] = static_cast<int64_t>(v[c]);
    }
  }
  return result;
}

at::Tensor scatter_blocks_cpu(const at::Tensor& src, const at::Tensor& block_ids, at::TensorList layers,
                              int64_t chunk_blocks, const std::optional<at::Tensor>& expected,
                              c10::string_view transfer) {
  check_transfer(transfer, "scatter_blocks");
  auto p = plan_blocks(layers, block_ids, src, "src", chunk_blocks, "scatter_blocks");
  TORCH_CHECK_VALUE(layers[0].device().is_cpu(), "scatter_blocks: layers are on ", layers[0].device(),
                    "; the CPU kernel needs CPU layers");
  bool verify = expected.has_value() && expected->defined();
  if (verify) {
    TORCH_CHECK_VALUE(chunk_blocks > 0, "scatter_blocks: expected needs chunk_blocks > 0");
    check_index_tensor(*expected, "expected", "scatter_blocks");
    TORCH_CHECK_VALUE(expected->size(0) == p.n_chunks, "scatter_blocks: expected has ", expected->size(0),
                      " checksums but there are ", p.n_chunks, " chunks");
    TORCH_CHECK_VALUE(expected->device().is_cpu(), "scatter_blocks: expected must be on the CPU, got ",
                      expected->device());
  }
  auto ids = host_block_ids(block_ids, p.num_blocks);
  auto ok = at::empty({verify ? p.n_chunks : 0}, block_ids.options().dtype(at::kBool).device(at::kCPU));
  bool fused = verify && p.page_bytes % 8 == 0;
  std::vector<uint64_t> values;
  if (verify && !fused) values = chunk_checksums_of(p, byte_ptr(src), TorchParallel{});
  auto sums = copy_pages(p, ids.data(), byte_ptr(src), Direction::kScatter, fused, TorchParallel{});
  if (verify) {
    auto exp = expected->contiguous();
    const int64_t* e = exp.data_ptr<int64_t>();
    bool* r = ok.data_ptr<bool>();
    for (int64_t c = 0; c < p.n_chunks; ++c) {
      uint64_t v = fused ? checksum::finalize(sums[c], p.chunk_len(c)) : values[c];
      r[c] = static_cast<int64_t>(v) == e[c];
    }
  }
  return ok;
}

}  // namespace

TORCH_LIBRARY_IMPL(stratacache, CPU, m) {
  m.impl("checksum64", &checksum64_cpu);
  m.impl("chunk_checksums", &chunk_checksums_cpu);
  m.impl("gather_blocks", &gather_blocks_cpu);
  m.impl("scatter_blocks", &scatter_blocks_cpu);
}

}  // namespace stratacache
