"""The CUDA kernels compile with nvcc on a machine without a GPU.

.ci/cuda_compile_check.sh calls nvcc against the installed (CPU) torch's
headers with a shim for the one generated header a CPU torch lacks. The
kernels only run on a GPU machine (tests/test_ops_cuda.py, benchmarks/gpu_check.sh).
"""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    assert Path(nvcc).exists(), "nvcc is required for the CUDA compile check"
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources found"
    run = subprocess.run(["bash", str(ROOT / ".ci" / "cuda_compile_check.sh"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-6000:]
    for src in sources:
        obj = tmp_path / (src.stem + ".o")
        assert obj.exists() and obj.stat().st_size > 0, f"{obj} was not produced"
    symbols = subprocess.run(["nm", "-C", str(tmp_path / "kv_transfer_cuda.o")], capture_output=True,
                             text=True, check=True).stdout
    for kernel in ("block_copy_kernel", "chunk_sum_kernel", "finalize_kernel"):
        assert kernel in symbols, f"{kernel} missing from the compiled object"
    for op in ("gather_blocks_cuda", "scatter_blocks_cuda", "checksum64_cuda"):
        assert op in symbols, f"{op} missing from the compiled object"
