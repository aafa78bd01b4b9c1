"""Build StrataCache and its native extension ``stratacache._C``.

The CPU kernels (``csrc/*.cpp``) are always built. The CUDA kernels
(``csrc/cuda/*.cu``) are added when the installed torch was built with CUDA
and a CUDA toolkit is found; otherwise they are only compile-checked by
``.ci/cuda_compile_check.sh``.

Install with torch already present: ``pip install --no-build-isolation -e .``
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("STRATACACHE_NO_CUDA") == "1":
        with_cuda = False
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function"]
    sources = _sources("csrc/*.cpp")
    if with_cuda:
        return CUDAExtension(
            "stratacache._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("STRATACACHE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp", "-lrt"],
        )
    return CppExtension(
        "stratacache._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp", "-lrt"],
    )


setup(
    name="stratacache",
    version="0.1.0",
    description="Tiered KV-cache and artifact store for LLM inference (CPU, shared memory/CXL, disk, Redis)",
    packages=find_packages(include=["stratacache", "stratacache.*"]),
    package_data={"stratacache": ["config/default.yaml"]},
    python_requires=">=3.10",
    install_requires=["pyyaml", "numpy", "pydantic>=2,<3"],
    extras_require={"redis": ["redis>=7,<9", "hiredis"], "metrics": ["prometheus_client"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["stratacache = stratacache.cli.main:main"]},
)
