// The bfloat16 launchers of the CUDA kernels (mutual_loss_cuda_kernels.cuh): one translation unit
// per logits dtype, so that nvcc builds the dtypes in parallel.

#include "mutual_loss_cuda_kernels.cuh"

namespace fastdml {
namespace gpu {
namespace detail {

template cudaError_t launch_forward<__nv_bfloat16>(const MutualLossParams&, const DeviceInfo&,
                                                   cudaStream_t);
template cudaError_t launch_scale<__nv_bfloat16>(const ScaleGradParams&, const DeviceInfo&,
                                                 cudaStream_t);

}  // namespace detail
}  // namespace gpu
}  // namespace fastdml
