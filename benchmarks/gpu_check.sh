#!/usr/bin/env bash
# GPU check of the native ops, in one call (about 3-5 minutes, under 8):
#   1. build stratacache._C with the CUDA kernels (torch with CUDA + nvcc),
#   2. run every @pytest.mark.gpu test,
#   3. benchmark the CUDA paths (UVA kernel, staging + DMA, per-page
#      cudaMemcpyAsync loop, contiguous pinned copy ceiling; 16/64/256 KiB
#      pages, 32 and 80 layers; matmul slowdown during each path),
#   4. print a short table last.
# Made for a GPU machine with torch (CUDA build), nvcc, pytest and no network:
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (JSON + logs go to OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${1:-${OUT:-/tmp/stratacache-gpu-check}}
mkdir -p "$OUT"
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
PY
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST
fi

echo "== build (CUDA extension, arch $TORCH_CUDA_ARCH_LIST)" >&2
start=$(date +%s)
"$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -c 'import torch, stratacache.ops as o; assert torch._C._dispatch_has_kernel_for_dispatch_key("stratacache::gather_blocks", "CUDA"), "CUDA kernels not registered"'
echo "   built in $(( $(date +%s) - start )) s" >&2

echo "== GPU tests" >&2
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
test_rc=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" > "$OUT/pytest.log" 2>&1 || test_rc=$?
tail -15 "$OUT/pytest.log"

echo "== benchmark" >&2
bench_rc=0
"$PY" benchmarks/bench_ops.py --device cuda --repeat 10 --json "$OUT/bench_cuda.json" > "$OUT/bench.log" 2>&1 \
  || { bench_rc=$?; tail -30 "$OUT/bench.log"; }

echo
echo "== summary ($(( $(date +%s) - start )) s)"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -1
if [ -f "$OUT/bench_cuda.json" ]; then
  "$PY" - "$OUT/bench_cuda.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(r["device"])
cols = {"layers": "layers", "page_kib": "page KiB", "ceiling_GBps": "memcpy GB/s", "uva_GBps": "uva GB/s",
        "staging_GBps": "staging GB/s", "page_loop_GBps": "loop GB/s", "uva_vs_ceiling": "uva/memcpy",
        "uva_vs_page_loop": "uva/loop", "matmul_slowdown_uva": "mm slow uva", "matmul_slowdown_staging": "mm slow stg"}
print(" ".join(f"{v:>12}" for v in cols.values()))
for row in r["table"]:
    print(" ".join(f"{row[c]:>12.2f}" if isinstance(row[c], float) else f"{row[c]:>12}" for c in cols))
print(json.dumps(r["summary"]))
PY
fi
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
