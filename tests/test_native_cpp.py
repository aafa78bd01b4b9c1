"""Builds the native kernels and every csrc/tests/test_*.cpp with CMake under
AddressSanitizer + UndefinedBehaviorSanitizer and runs them with ctest.

The sanitizer build uses STRATACACHE_WITH_TORCH=OFF: the copy and checksum
loops (and the shared region and its pieces) are torch-free, so they build in seconds;
the thin torch-facing layer is covered by the Python tests.
"""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpp_kernels_pass_ctest_under_asan_ubsan(tmp_path):
    for tool in ("cmake", "ctest"):
        assert shutil.which(tool), f"{tool} is required for the C++ tests"
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DSTRATACACHE_WITH_TORCH=OFF",
                    "-DSTRATACACHE_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug"],
                   check=True, capture_output=True, text=True, env=env)
    built = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    tests = sorted(p.stem for p in (ROOT / "csrc" / "tests").glob("test_*.cpp"))
    # The shared region's pieces each have their own test (RegionFile, HashIndex,
    # BlockAllocator, LeaseTable, ClockEvictor) beside the wired SharedRegion's.
    assert {"test_checksum", "test_kv_transfer", "test_shared_region", "test_region_file", "test_hash_index",
            "test_block_allocator", "test_lease_table", "test_clock_evictor"} <= set(tests)
    run = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "100% tests passed" in run.stdout
    for name in tests:   # every C++ test file became a ctest test that ran
        assert name in run.stdout, f"{name} did not run under ctest"
