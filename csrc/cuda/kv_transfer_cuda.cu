// CUDA kernels of the stratacache ops.
//
// One kernel launch moves every (block, layer) page. Each page is cut into
// segments of at most kSegmentBytes (32 KiB) and one warp moves one segment,
// so a call with a few large pages (a layer-wise load of one chunk) still
// spreads over every SM. Each lane moves 16-byte vectors (8- or 1-byte when
// an address or the page size is not 16-aligned), four vectors in flight per
// lane. The host side of a transfer is either
//   * "uva": pinned / cudaHostRegister'ed host memory addressed directly by the
//     kernel through unified virtual addressing (zero copy); chosen only when
//     the first and the last byte of the range map to one contiguous device
//     range (an allocation may straddle a registered and an unregistered piece),
//   * "staging": a device staging buffer filled or drained by the kernel plus
//     one cudaMemcpyAsync DMA of the whole flat buffer.
// "auto" uses uva for page-locked host memory and staging otherwise. Everything
// runs asynchronously on the caller's current stream; the returned checksum /
// verification tensors live on the device. A host buffer from torch's caching
// host allocator is recorded for that stream (as copy_ does), so dropping it
// right after the call cannot recycle it mid-copy. Checksums are the CPU's
// checksum64 (csrc/checksum.h): each warp sums its segment's word terms and
// adds them to its chunk's accumulator with one 64-bit atomicAdd (a sum is
// order-independent, and a segment starts on a word boundary).
#include <ATen/ATen.h>
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers): the compile check then needs nothing
// beyond the CUDA toolkit and torch's own headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/CachingHostAllocator.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checksum.h"
#include "kv_transfer_ops.h"

namespace stratacache {
namespace {

using checksum::finalize;
using checksum::word_term;

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kUnroll = 4;
// Bytes one warp moves per work item (a multiple of 16, so every segment of a
// 16-aligned page stays 16-aligned and starts on a checksum word).
constexpr int64_t kSegmentBytes = int64_t{1} << 15;

// ----------------------------------------------------------------------------- vector helpers

template <typename V>
struct VecWords;  // the 64-bit checksum words of one vector (byte copies carry no fused sums)
template <>
struct VecWords<uint4> {
  static constexpr int n = 2;
  __device__ static uint64_t word(const uint4& v, int k) {
    return k == 0 ? (uint64_t(v.y) << 32 | v.x) : (uint64_t(v.w) << 32 | v.z);
  }
};
template <>
struct VecWords<uint2> {
  static constexpr int n = 1;
  __device__ static uint64_t word(const uint2& v, int) { return uint64_t(v.y) << 32 | v.x; }
};
__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Copies `bytes` (a multiple of sizeof(V)) from src to dst with one warp;
// with kSums returns (on lane 0) the word-term sum, word 0 being `first_word`.
template <typename V, bool kSums>
__device__ __forceinline__ uint64_t warp_copy(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src,
                                              int64_t bytes, uint64_t first_word, int lane) {
  const int64_t nvec = bytes / static_cast<int64_t>(sizeof(V));
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  uint64_t sum = 0;
  int64_t i = lane;
  for (; i + (kUnroll - 1) * kWarp < nvec; i += kUnroll * kWarp) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = s[i + u * kWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      d[i + u * kWarp] = v[u];
      if constexpr (kSums) {
#pragma unroll
        for (int k = 0; k < VecWords<V>::n; ++k)
          sum += word_term(VecWords<V>::word(v[u], k), first_word + uint64_t(i + u * kWarp) * VecWords<V>::n + k);
      }
    }
  }
  for (; i < nvec; i += kWarp) {
    V v = s[i];
    d[i] = v;
    if constexpr (kSums) {
#pragma unroll
      for (int k = 0; k < VecWords<V>::n; ++k)
        sum += word_term(VecWords<V>::word(v, k), first_word + uint64_t(i) * VecWords<V>::n + k);
    }
  }
  return kSums ? warp_sum(sum) : 0;
}

// ----------------------------------------------------------------------------- block kernels

// Segments of a page of `page_bytes`: at least one, so an empty page is one empty item.
__host__ __device__ inline int64_t segments_per_page(int64_t page_bytes) {
  return page_bytes > kSegmentBytes ? (page_bytes + kSegmentBytes - 1) / kSegmentBytes : 1;
}

// table: [L layer base addresses][L block strides][n block ids] (int64).
// Block i's pages lie at flat + i * R (R == L * P unless flat is a layer slice; no sums then).
// Work item = (block i, layer l, segment s) of segments_per_page(P) segments per page.
template <typename V, bool kSums, bool kGather>
__global__ void block_copy_kernel(const int64_t* __restrict__ table, int64_t L, int64_t n, int64_t P,
                                  uint8_t* __restrict__ flat, int64_t R, int64_t chunk_blocks,
                                  unsigned long long* __restrict__ chunk_sums) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  const int64_t segs = segments_per_page(P);
  const int64_t items = n * L * segs;
  for (int64_t item = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; item < items;
       item += warps) {
    const int64_t page = item / segs, off = (item % segs) * kSegmentBytes;
    const int64_t len = min(kSegmentBytes, P - off);
    const int64_t i = page / L, l = page % L;
    uint8_t* paged = reinterpret_cast<uint8_t*>(table[l]) + table[2 * L + i] * table[L + l] + off;
    uint8_t* linear = flat + i * R + l * P + off;
    uint64_t first_word = 0;
    if constexpr (kSums) first_word = uint64_t(page * P + off - (i / chunk_blocks) * chunk_blocks * L * P) / 8;
    uint64_t s = kGather ? warp_copy<V, kSums>(linear, paged, len, first_word, lane)
                         : warp_copy<V, kSums>(paged, linear, len, first_word, lane);
    if (kSums && lane == 0) atomicAdd(chunk_sums + i / chunk_blocks, static_cast<unsigned long long>(s));
  }
}

// Sums of the word terms of each chunk of a flat byte range (any alignment):
// blockIdx.y strides over chunks, blockIdx.x over the words of a chunk.
__global__ void chunk_sum_kernel(const uint8_t* __restrict__ data, int64_t nbytes, int64_t chunk_bytes,
                                 int64_t nchunks, unsigned long long* __restrict__ sums) {
  for (int64_t c = blockIdx.y; c < nchunks; c += gridDim.y) {
    const int64_t start = c * chunk_bytes;
    const int64_t len = min(chunk_bytes, nbytes - start);
    const int64_t nwords = (len + 7) / 8;
    const uint8_t* p = data + start;
    uint64_t sum = 0;
    for (int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; w < nwords;
         w += int64_t(gridDim.x) * blockDim.x) {
      const int64_t off = w * 8;
      uint64_t word = 0;
      if (off + 8 <= len && (reinterpret_cast<uintptr_t>(p + off) & 7) == 0) {
        word = *reinterpret_cast<const uint64_t*>(p + off);
      } else {
        for (int b = 0; b < 8 && off + b < len; ++b) word |= uint64_t(p[off + b]) << (8 * b);
      }
      sum += word_term(word, uint64_t(w));
    }
    sum = warp_sum(sum);
    if (threadIdx.x % kWarp == 0 && sum) atomicAdd(sums + c, static_cast<unsigned long long>(sum));
  }
}

// out[c] = finalize(sums[c], length of chunk c); with `expected`, ok[c] = (out[c] == expected[c]).
__global__ void finalize_kernel(const unsigned long long* __restrict__ sums, int64_t nchunks, int64_t total_bytes,
                                int64_t chunk_bytes, int64_t* __restrict__ out, const int64_t* __restrict__ expected,
                                bool* __restrict__ ok) {
  int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= nchunks) return;
  uint64_t len = uint64_t(min(chunk_bytes, total_bytes - c * chunk_bytes));
  int64_t v = static_cast<int64_t>(finalize(sums[c], len));
  if (out) out[c] = v;
  if (ok) ok[c] = v == expected[c];
}

// ----------------------------------------------------------------------------- host helpers

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t sm_count() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}

// CTAs for a warp-per-item kernel: enough for every item, at most 16 per SM.
int64_t grid_for(int64_t warps_needed) {
  int64_t ctas = (warps_needed + kThreads / kWarp - 1) / (kThreads / kWarp);
  return std::max<int64_t>(1, std::min<int64_t>(ctas, sm_count() * 16));
}

// Device address of one page-locked host byte, or null when it is not page-locked.
uint8_t* uva_byte(const void* p) {
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
  if (attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr) return nullptr;
  return static_cast<uint8_t*>(attr.devicePointer);
}

// Device view of the bytes [data_ptr, data_ptr + nbytes) of a host buffer (see uva_range_of).
uint8_t* uva_range(const at::Tensor& flat, int64_t nbytes) {
  return uva_range_of(static_cast<const uint8_t*>(flat.data_ptr()), nbytes, uva_byte);
}

// Host bytes a kernel or DMA addresses: from data_ptr to the end of the last block row.
int64_t host_span(const BlockPlan& p) {
  return p.n_blocks == 0 ? 0 : (p.n_blocks - 1) * p.row_bytes() + p.n_layers * p.page_bytes;
}

// A torch-pinned host buffer used asynchronously on the current stream stays
// allocated until that stream reaches this point (raw kernels and
// cudaMemcpyAsync do not tell torch's caching host allocator by themselves).
void record_host_use(const at::Tensor& flat) {
  if (flat.is_cuda() || !flat.has_storage()) return;
  const auto& data = flat.storage().data_ptr();
  at::getHostAllocator(at::kCUDA)->record_event(data.get(), data.get_context(),
                                                c10::cuda::getCurrentCUDAStream());
}

enum class Path { kUva, kStaging };

Path choose_path(const at::Tensor& flat, int64_t span, c10::string_view transfer, const char* op,
                 const char* flat_name) {
  check_transfer(transfer, op);
  if (flat.is_cuda()) return Path::kUva;  // device-resident: addressed directly
  bool pinned = uva_range(flat, span) != nullptr;
  if (transfer == "uva") {
    TORCH_CHECK_VALUE(pinned, op, ": transfer='uva' needs all ", span, " bytes of ", flat_name,
                      " in one pinned or cudaHostRegister'ed host range");
    return Path::kUva;
  }
  if (transfer == "staging") return Path::kStaging;
  return pinned ? Path::kUva : Path::kStaging;
}

// Uploads [bases][strides][ids] to the device on the current stream.
at::Tensor upload_table(const BlockPlan& p, const std::vector<int64_t>& ids, c10::Device dev) {
  auto host = at::empty({2 * p.n_layers + static_cast<int64_t>(ids.size())},
                        at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t l = 0; l < p.n_layers; ++l) {
    h[l] = reinterpret_cast<int64_t>(p.layer_base[l]);
    h[p.n_layers + l] = p.layer_block_stride[l];
  }
  std::memcpy(h + 2 * p.n_layers, ids.data(), ids.size() * sizeof(int64_t));
  return host.to(dev, /*non_blocking=*/true);
}

bool aligned(const BlockPlan& p, const uint8_t* flat, int64_t row_bytes, int64_t a) {
  if (p.page_bytes % a || row_bytes % a || reinterpret_cast<uintptr_t>(flat) % a) return false;
  for (int64_t l = 0; l < p.n_layers; ++l)
    if (reinterpret_cast<uintptr_t>(p.layer_base[l]) % a || p.layer_block_stride[l] % a) return false;
  return true;
}

template <bool kSums, bool kGather>
void launch_block_copy(const BlockPlan& p, const at::Tensor& table, uint8_t* flat, int64_t row_bytes,
                       unsigned long long* sums) {
  if (p.n_blocks == 0) return;
  dim3 grid(static_cast<unsigned>(grid_for(p.n_blocks * p.n_layers * segments_per_page(p.page_bytes)))),
      block(kThreads);
  const int64_t* t = table.data_ptr<int64_t>();
  if (aligned(p, flat, row_bytes, 16)) {
    block_copy_kernel<uint4, kSums, kGather><<<grid, block, 0, current_stream()>>>(
        t, p.n_layers, p.n_blocks, p.page_bytes, flat, row_bytes, p.chunk_blocks, sums);
  } else if (aligned(p, flat, row_bytes, 8)) {
    block_copy_kernel<uint2, kSums, kGather><<<grid, block, 0, current_stream()>>>(
        t, p.n_layers, p.n_blocks, p.page_bytes, flat, row_bytes, p.chunk_blocks, sums);
  } else {
    TORCH_INTERNAL_ASSERT(!kSums, "fused checksums need 8-byte aligned pages");
    block_copy_kernel<uint8_t, false, kGather><<<grid, block, 0, current_stream()>>>(
        t, p.n_layers, p.n_blocks, p.page_bytes, flat, row_bytes, p.chunk_blocks, sums);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Word-term sums of each chunk of a device-addressable byte range.
void launch_chunk_sums(const uint8_t* data, int64_t nbytes, int64_t chunk_bytes, int64_t nchunks,
                       unsigned long long* sums) {
  if (nbytes == 0 || nchunks == 0) return;
  // About 8 CTAs per SM in all, spread over the chunks.
  const int64_t words_per_chunk = (std::min(chunk_bytes, nbytes) + 7) / 8;
  const int64_t per_chunk = std::clamp<int64_t>(std::max<int64_t>(sm_count() * 8 / nchunks, 1), 1,
                                                (words_per_chunk + kThreads - 1) / kThreads);
  dim3 grid(static_cast<unsigned>(per_chunk), static_cast<unsigned>(std::min<int64_t>(nchunks, 65535)));
  chunk_sum_kernel<<<grid, kThreads, 0, current_stream()>>>(data, nbytes, chunk_bytes, nchunks, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_finalize(const at::Tensor& sums, int64_t nchunks, int64_t total, int64_t chunk_bytes, int64_t* out,
                     const int64_t* expected, bool* ok) {
  if (nchunks == 0) return;
  unsigned grid = static_cast<unsigned>((nchunks + kThreads - 1) / kThreads);
  finalize_kernel<<<grid, kThreads, 0, current_stream()>>>(
      reinterpret_cast<const unsigned long long*>(sums.data_ptr<int64_t>()), nchunks, total, chunk_bytes, out,
      expected, ok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned long long* sums_ptr(const at::Tensor& t) {
  return reinterpret_cast<unsigned long long*>(t.data_ptr<int64_t>());
}

// ----------------------------------------------------------------------------- ops

at::Tensor checksums_cuda(const at::Tensor& data, int64_t chunk_bytes, bool scalar) {
  check_contiguous_bytes(data, "data");
  c10::cuda::CUDAGuard guard(data.device());
  int64_t nbytes = static_cast<int64_t>(data.nbytes());
  int64_t nchunks = scalar ? 1 : checksum::chunk_count(nbytes, chunk_bytes);
  if (scalar) chunk_bytes = std::max<int64_t>(nbytes, 1);
  auto sums = at::zeros({nchunks}, data.options().dtype(at::kLong));
  auto out = at::empty({nchunks}, data.options().dtype(at::kLong));
  launch_chunk_sums(static_cast<const uint8_t*>(data.data_ptr()), nbytes, chunk_bytes, nchunks, sums_ptr(sums));
  launch_finalize(sums, nchunks, nbytes, chunk_bytes, out.data_ptr<int64_t>(), nullptr, nullptr);
  return scalar ? out.reshape({}) : out;
}

at::Tensor checksum64_cuda(const at::Tensor& data) { return checksums_cuda(data, 0, true); }

at::Tensor chunk_checksums_cuda(const at::Tensor& data, int64_t chunk_bytes) {
  TORCH_CHECK_VALUE(chunk_bytes > 0, "chunk_checksums: chunk_bytes must be positive, got ", chunk_bytes);
  return checksums_cuda(data, chunk_bytes, false);
}

// Checksums of a transfer that moves no bytes: every chunk is the empty byte string.
at::Tensor checksums_of_empty_chunks(const BlockPlan& p, const at::TensorOptions& options) {
  return at::full({p.n_chunks}, static_cast<int64_t>(finalize(0, 0)), options.dtype(at::kLong));
}

// The flat buffer as the kernel addresses it, and the staging tensor if any.
struct FlatSide {
  uint8_t* kernel_ptr;
  at::Tensor staging;
};

FlatSide flat_side(const at::Tensor& flat, Path path, int64_t nbytes, int64_t span, c10::Device dev) {
  if (flat.is_cuda()) return {static_cast<uint8_t*>(flat.data_ptr()), {}};
  if (path == Path::kUva) return {uva_range(flat, span), {}};
  auto staging = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(dev));
  return {static_cast<uint8_t*>(staging.data_ptr()), staging};
}

// Bytes between block rows of a block transfer's flat side as the kernel sees it: a
// staging buffer is contiguous, host or device memory addressed directly keeps its stride.
int64_t kernel_row_bytes(const BlockPlan& p, const FlatSide& side) {
  return side.staging.defined() ? p.n_layers * p.page_bytes : p.row_bytes();
}

// DMA between the host flat buffer (rows p.row_bytes() apart) and a contiguous staging buffer.
void copy_staging(const BlockPlan& p, void* dst, const void* src, bool to_device) {
  const int64_t width = p.n_layers * p.page_bytes, host_pitch = p.row_bytes();
  if (p.n_blocks == 0 || width == 0) return;
  const auto kind = to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  if (host_pitch == width) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, p.n_blocks * width, kind, current_stream()));
  } else {
    C10_CUDA_CHECK(cudaMemcpy2DAsync(dst, to_device ? width : host_pitch, src, to_device ? host_pitch : width, width,
                                     p.n_blocks, kind, current_stream()));
  }
}

at::Tensor gather_blocks_cuda(at::TensorList layers, const at::Tensor& block_ids, const at::Tensor& out,
                              int64_t chunk_blocks, c10::string_view transfer) {
  auto p = plan_blocks(layers, block_ids, out, "out", chunk_blocks, "gather_blocks");
  auto dev = layers[0].device();
  TORCH_CHECK_VALUE(dev.is_cuda(), "gather_blocks: layers are on ", dev, "; the CUDA kernel needs CUDA layers");
  c10::cuda::CUDAGuard guard(dev);
  check_transfer(transfer, "gather_blocks");
  auto ids = host_block_ids(block_ids, p.num_blocks);
  // Checksums imply a contiguous flat side (plan_blocks), so row_bytes == L * P whenever they are taken.
  const int64_t total = p.n_blocks * p.n_layers * p.page_bytes;
  if (total == 0) {  // nothing to move (an empty host tensor may not even have an address)
    return checksums_of_empty_chunks(p, layers[0].options());
  }
  Path path = choose_path(out, host_span(p), transfer, "gather_blocks", "out");
  auto side = flat_side(out, path, total, host_span(p), dev);
  const int64_t row = kernel_row_bytes(p, side);
  auto table = upload_table(p, ids, dev);
  auto result = at::empty({p.n_chunks}, layers[0].options().dtype(at::kLong));
  auto sums = at::zeros({p.n_chunks}, layers[0].options().dtype(at::kLong));
  bool fused = chunk_blocks > 0 && aligned(p, side.kernel_ptr, row, 8);
  if (fused) {
    launch_block_copy<true, true>(p, table, side.kernel_ptr, row, sums_ptr(sums));
  } else {
    launch_block_copy<false, true>(p, table, side.kernel_ptr, row, nullptr);
    if (chunk_blocks > 0) launch_chunk_sums(side.kernel_ptr, total, p.chunk_bytes(), p.n_chunks, sums_ptr(sums));
  }
  launch_finalize(sums, p.n_chunks, total, p.chunk_bytes(), result.data_ptr<int64_t>(), nullptr, nullptr);
  if (side.staging.defined()) copy_staging(p, out.data_ptr(), side.kernel_ptr, /*to_device=*/false);
  record_host_use(out);
  return result;
}

at::Tensor scatter_blocks_cuda(const at::Tensor& src, const at::Tensor& block_ids, at::TensorList layers,
                               int64_t chunk_blocks, const std::optional<at::Tensor>& expected,
                               c10::string_view transfer) {
  auto p = plan_blocks(layers, block_ids, src, "src", chunk_blocks, "scatter_blocks");
  auto dev = layers[0].device();
  TORCH_CHECK_VALUE(dev.is_cuda(), "scatter_blocks: layers are on ", dev, "; the CUDA kernel needs CUDA layers");
  c10::cuda::CUDAGuard guard(dev);
  bool verify = expected.has_value() && expected->defined();
  if (verify) {
    TORCH_CHECK_VALUE(chunk_blocks > 0, "scatter_blocks: expected needs chunk_blocks > 0");
    TORCH_CHECK_TYPE(expected->scalar_type() == at::kLong, "scatter_blocks: expected must be int64, got ",
                     expected->scalar_type());
    TORCH_CHECK_VALUE(expected->dim() == 1 && expected->size(0) == p.n_chunks, "scatter_blocks: expected has ",
                      expected->numel(), " checksums but there are ", p.n_chunks, " chunks");
  }
  check_transfer(transfer, "scatter_blocks");
  auto ids = host_block_ids(block_ids, p.num_blocks);
  const int64_t total = p.n_blocks * p.n_layers * p.page_bytes;
  if (total == 0) {  // no bytes: each (empty) chunk matches only the empty string's checksum
    if (!verify) return at::empty({0}, layers[0].options().dtype(at::kBool));
    auto empty = checksums_of_empty_chunks(p, layers[0].options());
    return empty.eq(expected->to(empty.device()));
  }
  Path path = choose_path(src, host_span(p), transfer, "scatter_blocks", "src");
  auto side = flat_side(src, path, total, host_span(p), dev);
  const int64_t row = kernel_row_bytes(p, side);
  if (side.staging.defined()) copy_staging(p, side.kernel_ptr, src.data_ptr(), /*to_device=*/true);
  auto table = upload_table(p, ids, dev);
  auto ok = at::empty({verify ? p.n_chunks : 0}, layers[0].options().dtype(at::kBool));
  auto sums = at::zeros({verify ? p.n_chunks : 0}, layers[0].options().dtype(at::kLong));
  bool fused = verify && aligned(p, side.kernel_ptr, row, 8);
  if (fused) {
    launch_block_copy<true, false>(p, table, side.kernel_ptr, row, sums_ptr(sums));
  } else {
    if (verify) launch_chunk_sums(side.kernel_ptr, total, p.chunk_bytes(), p.n_chunks, sums_ptr(sums));
    launch_block_copy<false, false>(p, table, side.kernel_ptr, row, nullptr);
  }
  if (verify) {
    auto exp = expected->to(dev, /*non_blocking=*/true).contiguous();
    launch_finalize(sums, p.n_chunks, total, p.chunk_bytes(), nullptr, exp.data_ptr<int64_t>(), ok.data_ptr<bool>());
  }
  record_host_use(src);
  return ok;
}

}  // namespace

TORCH_LIBRARY_IMPL(stratacache, CUDA, m) {
  m.impl("checksum64", &checksum64_cuda);
  m.impl("chunk_checksums", &chunk_checksums_cuda);
  m.impl("gather_blocks", &gather_blocks_cuda);
  m.impl("scatter_blocks", &scatter_blocks_cuda);
}

}  // namespace stratacache
