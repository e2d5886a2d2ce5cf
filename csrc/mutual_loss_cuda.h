// Plain C++ interface of the CUDA kernels of fastdml::mutual_loss_with_grad and
// fastdml::scale_grad_rows_ (defined in mutual_loss_cuda_api.cu, kernels in
// mutual_loss_cuda_kernels.cuh). No torch types: the .cu files compile with nvcc alone, and their
// binding (mutual_loss_cuda.cpp) fills these structs from tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastdml {
namespace gpu {

// dtype of the logits and of the gradient; losses are float64 for Float64, else float32 (the
// accumulation dtype, also that of weights, row_scale and grad_loss).
enum class DType : int { Float32, Float64, Float16, BFloat16 };

// The same modes as fastdml::Mode (mutual_loss.h), which needs torch headers.
enum class LossMode : int { Pairwise, Ensemble, EnsembleLogits, Weights };

// What the launchers need to know about the device: the binding reads it from the driver once per
// device and caches it, so no launch queries the driver.
struct DeviceInfo {
  int num_sms;
  int smem_per_sm;          // shared memory per multiprocessor, bytes
  int smem_per_block_optin;  // the most dynamic + static shared memory one block may opt into
};

struct MutualLossParams {
  // [K, R, C] with unit class stride; strides in elements.
  const void* logits;
  int64_t stride_k;
  int64_t stride_r;
  const int64_t* target;  // [R], stride in elements
  int64_t target_stride;
  const void* weights;    // [K, K] contiguous, accumulation dtype; read in mode Weights only
  // The gradient's scale, accumulation dtype, on the device: row_scale[k * row_scale_stride_k +
  // r * row_scale_stride_r] for peer k and row r (both strides 0 for one value, any otherwise).
  // The forward writes s * gradient there, s being that value, or 1 where it is 0 (a zero scale
  // folds nothing in).
  const void* row_scale;
  int64_t row_scale_stride_k;
  int64_t row_scale_stride_r;
  void* loss;             // [K, R] contiguous, accumulation dtype
  void* ce;               // [K, R]
  void* mimicry;          // [K, R]
  void* grad;             // [K, R, C] contiguous, logits dtype; unused unless compute_grad
  int64_t K;
  int64_t R;
  int64_t C;
  DType dtype;
  LossMode mode;
  double temperature;
  double alpha;
  double label_smoothing;
  int64_t ignore_index;
  bool compute_grad;
  // Scratch of mutual_loss_workspace_bytes(...) bytes on the device (null when that is 0),
  // aligned for the accumulation dtype.
  void* workspace;
};

struct ScaleGradParams {
  void* grad;             // [K, R, C] contiguous
  const void* grad_loss;  // [K, R], accumulation dtype, any strides (in elements)
  int64_t grad_loss_stride_k;
  int64_t grad_loss_stride_r;
  // The scale the forward was given, as in MutualLossParams: row (k, r) is multiplied by
  // grad_loss[k, r] / s, s = row_scale[k, r] or 1 where that is 0, and left alone where
  // grad_loss[k, r] == s.
  const void* row_scale;
  int64_t row_scale_stride_k;
  int64_t row_scale_stride_r;
  int64_t K;
  int64_t R;
  int64_t C;
  DType dtype;
};

// Enqueue the kernels on `stream` (one launch, or three for the split forward, one for the
// backward); nothing synchronizes. They return the error of any CUDA call made before the launches
// (a kernel attribute); the caller checks the launches with cudaGetLastError
// (C10_CUDA_KERNEL_LAUNCH_CHECK). Empty problems launch nothing.
// Bytes of scratch the forward needs (when it splits the classes of few long rows across blocks),
// for the same params (but workspace) and device.
int64_t mutual_loss_workspace_bytes(const MutualLossParams& params, const DeviceInfo& device);
cudaError_t launch_mutual_loss_with_grad(const MutualLossParams& params, const DeviceInfo& device,
                                         cudaStream_t stream);
cudaError_t launch_scale_grad_rows(const ScaleGradParams& params, const DeviceInfo& device,
                                   cudaStream_t stream);

}  // namespace gpu
}  // namespace fastdml
