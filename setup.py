"""Builds the native ops (`fastdml._C`) with torch's C++ extension tooling.

The CPU op is compiled for AVX2/FMA on x86-64 (ATen's `at::vec` picks its 256-bit path from
`CPU_CAPABILITY_AVX2`); elsewhere `at::vec` falls back to its portable implementation. On Linux it
is built with OpenMP, as torch is: `at::parallel_for` in an extension runs on one thread without it.
The CUDA kernels (csrc/*.cu and their bindings, csrc/*_cuda.cpp) join the same extension when
torch was built with CUDA and nvcc is found; the architectures are torch's defaults for the GPUs
present, or TORCH_CUDA_ARCH_LIST. The kernels are split into one translation unit per logits dtype
(csrc/mutual_loss_cuda_<dtype>.cu), which ninja compiles in parallel (MAX_JOBS limits the jobs).

`cxx_flags()` and `nvcc_flags()` are read by .ci/compile_cuda.sh, which runs this file under another
name than __main__ (no setup()).
"""

import glob
import os
import platform
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ModuleNotFoundError as error:
    if error.name != "torch":
        raise
    # the build backend would print a raw traceback; this says what to do
    sys.exit(
        "fastdml builds its C++ op against the installed PyTorch: install torch first "
        "(pip install torch), then pip install --no-build-isolation ."
    )

OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def cxx_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fvisibility=hidden", *OPENMP]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def nvcc_flags() -> list[str]:
    # No --use_fast_math: the kernels choose their approximate instructions themselves (ex2.approx
    # in the per-class loops) and keep the rest exact (docs/design.md, The kernel plan).
    # --threads 0: the architectures of one translation unit compile in parallel (one thread per CPU
    # at most).
    return ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--threads", "0"]


def extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    headers = glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh"))
    options = dict(extra_link_args=OPENMP, depends=sorted(headers))
    if torch.version.cuda and CUDA_HOME is not None:
        # Object files are named by the sources' stems: x.cpp and x.cu would both make x.o.
        stems = [os.path.splitext(path)[0] for path in cpp + cuda]
        clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
        if clashes:
            raise RuntimeError(f"csrc: a .cpp and a .cu share the stem of {clashes}")
        flags = {"cxx": cxx_flags(), "nvcc": nvcc_flags()}
        return CUDAExtension("fastdml._C", cpp + cuda, extra_compile_args=flags, **options)
    cpu_only = [path for path in cpp if not path.endswith("_cuda.cpp")]
    return CppExtension("fastdml._C", cpu_only, extra_compile_args={"cxx": cxx_flags()}, **options)


if __name__ == "__main__":
    setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
