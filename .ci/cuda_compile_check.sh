#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (csrc/cuda/*.cu) with nvcc, on a
# machine without a GPU and with the CPU build of torch.
#
# torch.utils.cpp_extension refuses CUDAExtension without CUDA_HOME and a CUDA
# torch, so nvcc is called directly against the installed torch's headers. A
# CPU torch lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h; a
# shim with its two lines is supplied. The kernels include only c10/cuda
# headers, so no cuBLAS/cuSPARSE/cuSOLVER headers are needed.
#
#   .ci/cuda_compile_check.sh [OUT_DIR]   objects are left in OUT_DIR if given
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCH=${STRATACACHE_CUDA_ARCH:-90}
[ -x "$NVCC" ] || { echo "cuda_compile_check: nvcc not found (set NVCC)" >&2; exit 2; }

OUT=${1:-}
if [ -z "$OUT" ]; then OUT=$(mktemp -d /tmp/stratacache-cuda-check.XXXXXX); trap 'rm -rf "$OUT"' EXIT; fi
mkdir -p "$OUT/shim/c10/cuda/impl"

read -r -a TORCH_INC < <("$PY" -c '
import sysconfig, torch.utils.cpp_extension as c
print(" ".join(c.include_paths() + [sysconfig.get_paths()["include"]]))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
if ! ls "${TORCH_INC[0]}/c10/cuda/impl/cuda_cmake_macros.h" >/dev/null 2>&1; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/shim/c10/cuda/impl/cuda_cmake_macros.h"
fi
INC=(-Icsrc -I"$OUT/shim")
for d in "${TORCH_INC[@]}"; do INC+=(-I"$d"); done

status=0
for src in csrc/cuda/*.cu; do
  obj="$OUT/$(basename "${src%.cu}").o"
  echo "nvcc $src -> sm_$ARCH" >&2
  if ! "$NVCC" -c "$src" -o "$obj" -std=c++20 -O2 --expt-relaxed-constexpr -Xcompiler -fPIC \
      -gencode "arch=compute_$ARCH,code=sm_$ARCH" -DSTRATACACHE_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C \
      -D_GLIBCXX_USE_CXX11_ABI="$ABI" "${INC[@]}"; then
    status=1
  fi
done
exit $status
