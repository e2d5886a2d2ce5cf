"""Builds the native ops (`fastdml._C`) with torch's C++ extension tooling.

The CPU op is compiled for AVX2/FMA on x86-64 (ATen's `at::vec` picks its 256-bit path from
`CPU_CAPABILITY_AVX2`); elsewhere `at::vec` falls back to its portable implementation. On Linux it
is built with OpenMP, as torch is: `at::parallel_for` in an extension runs on one thread without it.
"""

import glob
import os
import platform
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def cxx_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fvisibility=hidden", *OPENMP]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))

setup(
    ext_modules=[
        CppExtension(
            "fastdml._C",
            sources,
            extra_compile_args={"cxx": cxx_flags()},
            extra_link_args=OPENMP,
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
