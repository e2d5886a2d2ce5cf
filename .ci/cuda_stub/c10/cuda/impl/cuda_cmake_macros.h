// CI only: a stand-in for the header that CMake generates from
// c10/cuda/impl/cuda_cmake_macros.h.in when torch is built with CUDA. A CPU wheel ships the c10/cuda
// and ATen/cuda headers but not this generated one, which c10/cuda/CUDAMacros.h includes, so the
// CUDA binding (csrc/mutual_loss_cuda.cpp) could not be compiled against it. .ci/compile_cuda.sh
// puts this directory after torch's include paths, so that a CUDA build of torch uses its own file.
// Never installed, never part of a real build.
#pragma once

#include <cuda_runtime_api.h>

// torch's wheels are shared libraries.
#define C10_CUDA_BUILD_SHARED_LIBS

// The CUDA version torch was built with; here, that of the toolkit that compiles the check.
#define TORCH_CUDA_VERSION_MAJOR (CUDART_VERSION / 1000)
#define TORCH_CUDA_VERSION_MINOR ((CUDART_VERSION % 1000) / 10)
#define TORCH_CUDA_VERSION_PATCH 0
#define TORCH_CUDA_VERSION_BUILD 0
