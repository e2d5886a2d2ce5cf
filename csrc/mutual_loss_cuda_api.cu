// Public entry points of the CUDA kernels (mutual_loss_cuda.h): each switches on the logits dtype
// and calls that dtype's launcher (mutual_loss_cuda_<dtype>.cu; the kernels and their design are in
// mutual_loss_cuda_kernels.cuh). No torch headers, no device code. Not named mutual_loss_cuda.cu:
// its object file would be that of the binding, mutual_loss_cuda.cpp (one name per stem).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mutual_loss_cuda.h"
#include "mutual_loss_cuda_launch.cuh"

namespace fastdml {
namespace gpu {
namespace {

// Calls f(S()) for the scalar type S of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32: return f(float());
    case DType::Float64: return f(double());
    case DType::Float16: return f(__half());
    case DType::BFloat16: return f(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_mutual_loss(const MutualLossParams& params, const DeviceInfo& device,
                               cudaStream_t stream) {
  if (params.K < 2 || params.R <= 0 || params.C <= 0) return cudaSuccess;
  return dispatch_dtype(params.dtype, [&](auto scalar) {
    return detail::launch_forward<decltype(scalar)>(params, device, stream);
  });
}

int64_t mutual_loss_workspace_bytes(const MutualLossParams& params, const DeviceInfo& device) {
  if (params.K < 2 || params.R <= 0 || params.C <= 0) return 0;
  return detail::workspace_layout(params, device).bytes;
}

cudaError_t launch_scale_grad(const ScaleGradParams& params, const DeviceInfo& device,
                              cudaStream_t stream) {
  if (params.K <= 0 || params.R <= 0 || params.C <= 0) return cudaSuccess;
  return dispatch_dtype(params.dtype, [&](auto scalar) {
    return detail::launch_scale<decltype(scalar)>(params, device, stream);
  });
}

}  // namespace gpu
}  // namespace fastdml
