// The one TORCH_LIBRARY block declaring every stratacache op schema. The CPU
// kernels register in kv_transfer_ops.cpp, the CUDA kernels in
// cuda/kv_transfer_cuda.cu; Python wrappers, fake (meta) kernels and the
// pure-torch references live in stratacache/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(stratacache, m) {
  // 0-d int64 tensor: checksum64 of the tensor's bytes (see checksum.h).
  m.def("checksum64(Tensor data) -> Tensor");
  // int64 [ceil(nbytes / chunk_bytes)]: checksum64 of each chunk_bytes slice.
  m.def("chunk_checksums(Tensor data, int chunk_bytes) -> Tensor");
  // Pages of block_ids from every layer into out (uint8 [n, L, page_bytes]);
  // returns int64 checksums, one per chunk of chunk_blocks blocks.
  // transfer picks the CUDA host path ("auto", "uva" or "staging"); the CPU kernels ignore it.
  m.def(
      "gather_blocks(Tensor[] layers, Tensor block_ids, Tensor(a!) out, int chunk_blocks=0, "
      "str transfer=\"auto\") -> Tensor");
  // The inverse; with expected checksums returns bool [n_chunks] (True: chunk intact).
  m.def(
      "scatter_blocks(Tensor src, Tensor block_ids, Tensor(a!)[] layers, int chunk_blocks=0, "
      "Tensor? expected=None, str transfer=\"auto\") -> Tensor");
}
