"""The shared-region C++ test (csrc/tests/test_shared_region.cpp) under
ThreadSanitizer, built through the project's CMake (torch-free core only).

The ASan/UBSan run of every C++ test is tests/test_native_cpp.py; this adds a
data-race check of the region's index, allocator and lease code with
threads and forked processes hammering one region.
"""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_shared_region_cpp_under_tsan(tmp_path):
    assert shutil.which("cmake"), "cmake is required for the C++ tests"
    build = tmp_path / "build-tsan"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    # STRATACACHE_NO_CLONES: plain loops instead of target_clones (ifunc), as for ASan.
    flags = "-fsanitize=thread -fno-omit-frame-pointer -Wno-tsan -DSTRATACACHE_NO_CLONES"
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DSTRATACACHE_WITH_TORCH=OFF",
                    "-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-DCMAKE_CXX_FLAGS={flags}",
                    "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread"],
                   check=True, capture_output=True, text=True, env=env)
    built = subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", "test_shared_region"],
                           capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    run = subprocess.run([str(build / "test_shared_region")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    assert "test_shared_region: all passed" in run.stdout
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
