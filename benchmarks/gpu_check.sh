#!/usr/bin/env bash
# GPU check of the native ops and the connector's data path, in one call (about 4-6
# minutes, under 8):
#   1. build stratacache._C with the CUDA kernels (torch with CUDA + nvcc),
#   2. the op tests on CUDA (every host path, segments, zero-byte, partly pinned ranges,
#      pinned buffers dropped mid-copy) and the layer-wise loads on CUDA,
#   3. the KV layout suite on CUDA: the worker's save and load (no vLLM needed) with caches
#      built like vLLM's model runner does, in every KVCacheLayout, MLA and fp8,
#   4. one compute-sanitizer memcheck of a small save + load,
#   5. benchmark the CUDA paths (UVA kernel, staging + DMA, per-page
#      cudaMemcpyAsync loop, contiguous pinned copy ceiling; 16/64/256 KiB
#      pages, 32 and 80 layers; matmul slowdown during each path),
#   6. print a short table last; exit 0 only when every check passed.
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

declare -a ROWS=()
failed=0
# check NAME LOG COMMAND...: run one check, record its status and time for the table.
check() {
  local name=$1 log=$2 t0 rc=0
  shift 2
  t0=$(date +%s)
  echo "== $name" >&2
  "$@" > "$OUT/$log" 2>&1 || rc=$?
  tail -5 "$OUT/$log" >&2
  local status=ok
  if [ "$rc" != 0 ]; then status="FAILED (rc $rc, $OUT/$log)"; failed=1; fi
  ROWS+=("$(printf '%-34s %6ss  %s' "$name" "$(( $(date +%s) - t0 ))" "$status")")
}
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m gpu)
check "op tests on CUDA" pytest_ops.log "${PYTEST[@]}" tests/test_ops_cuda.py tests/test_layerwise.py
check "layout suite + worker on CUDA" pytest_layouts.log "${PYTEST[@]}" tests/test_kv_layouts.py
SANITIZER=${COMPUTE_SANITIZER:-$CUDA_HOME/bin/compute-sanitizer}
if [ -x "$SANITIZER" ]; then
  check "compute-sanitizer memcheck" sanitizer.log timeout 300 "$SANITIZER" --tool memcheck \
    --error-exitcode 9 --target-processes all "${PYTEST[@]}" tests/test_kv_layouts.py \
    -k "round_trips_byte_exact and LHBNC and bf16 and cuda"
else
  ROWS+=("$(printf '%-34s %6ss  %s' "compute-sanitizer memcheck" 0 "FAILED (no $SANITIZER)")")
  failed=1
fi
check "benchmark (bench_ops --device cuda)" bench.log \
  "$PY" benchmarks/bench_ops.py --device cuda --repeat 10 --json "$OUT/bench_cuda.json"

echo
echo "== summary ($(( $(date +%s) - start )) s)"
if [ -f "$OUT/bench_cuda.json" ]; then
  "$PY" - "$OUT/bench_cuda.json" <<'PY' || failed=1
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
echo
printf '%-34s %7s  %s\n' "check" "time" "result"
for row in "${ROWS[@]}"; do echo "$row"; done
for log in pytest_ops.log pytest_layouts.log; do
  printf '  %-20s %s\n' "$log" "$(grep -E "passed|failed|error" "$OUT/$log" | tail -1)"
done
exit "$failed"
