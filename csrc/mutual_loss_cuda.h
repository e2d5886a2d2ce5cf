// Plain C++ interface of the CUDA kernels of fastdml::fused_mutual_loss and fastdml::scale_grad_
// (defined in mutual_loss_cuda_api.cu, kernels in mutual_loss_cuda_kernels.cuh). No torch types:
// the .cu files compile with nvcc alone, and their binding (mutual_loss_cuda.cpp) fills these
// structs from tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastdml {
namespace gpu {

// dtype of the logits and of the gradient; losses are float64 for Float64, else float32 (the
// accumulation dtype, also that of weights, row_scale and grad_loss).
enum class DType : int { Float32, Float64, Float16, BFloat16 };

// The same modes and reductions as fastdml::Mode and fastdml::Reduction (mutual_loss.h), which
// need torch headers.
enum class LossMode : int { Pairwise, Ensemble, EnsembleLogits, Weights };
enum class LossReduction : int { None, Sum, Mean };
// fastdml::Divergence: "jsd" at beta 0 or 1 arrives as the KL or reverse KL it is
// (computed_divergence).
enum class LossDivergence : int { KL, ReverseKL, JSD };

// What the launchers need to know about the device: the binding reads it from the driver once per
// device and caches it, so no launch queries the driver.
struct DeviceInfo {
  int num_sms;
  int smem_per_sm;          // shared memory per multiprocessor, bytes
  int smem_per_block_optin;  // the most dynamic + static shared memory one block may opt into
  bool clusters;             // launches of thread-block clusters (sm_90 on)
};

struct MutualLossParams {
  // [K, R, C] with unit class stride; strides in elements.
  const void* logits;
  int64_t stride_k;
  int64_t stride_r;
  const int64_t* target;  // [R], stride in elements
  int64_t target_stride;
  const void* weights;    // [K, K] contiguous, accumulation dtype; read in mode Weights only
  // grad_scale, accumulation dtype, on the device: row_scale[k * row_scale_stride_k +
  // r * row_scale_stride_r] for peer k and row r (both strides 0 for one value, any otherwise),
  // or null for 1. The forward writes the gradient of sum(grad_scale * loss), loss reduced as
  // asked: for "mean", each term's gradient is also divided as the term is (see normalizer).
  const void* row_scale;
  int64_t row_scale_stride_k;
  int64_t row_scale_stride_r;
  // Accumulation dtype. Reduction None: loss, ce, mimicry [K, R] contiguous; Sum and Mean: loss
  // 0-dim, ce and mimicry [K] (each peer's sum, or mean: see normalizer).
  void* loss;
  void* ce;
  void* mimicry;
  void* grad;             // [K, R, C] contiguous, logits dtype; unused unless compute_grad
  int64_t K;
  int64_t R;
  int64_t C;
  DType dtype;
  LossMode mode;
  LossReduction reduction;
  double temperature;
  double alpha;
  double label_smoothing;
  int64_t ignore_index;
  bool compute_grad;
  // Scratch of mutual_loss_workspace_bytes(...) bytes on the device (null when that is 0),
  // aligned for the accumulation dtype; nothing in it needs to start at any value.
  void* workspace;
  // Reduced losses: a counter on the device that is zero before the launch and that the launch
  // leaves zero (its last block resets it), so that no launch has to clear it. Forwards that may
  // run at the same time need counters of their own: one per stream.
  unsigned* ticket;
  // The loss family (docs/design.md, Other divergences). Any of them other than its default
  // (KL, ce_weight 1, no mimic_unlabeled, no normalizer) takes the any-K kernels.
  LossDivergence divergence;
  double beta;            // the JSD's, in (0, 1) (unread by the others)
  // The loss is ce_weight * ce + alpha * T^2 * mimicry; at 0 no cross-entropy is computed (its
  // terms are 0).
  double ce_weight;
  bool mimic_unlabeled;   // rows whose target is ignore_index keep their mimicry
  // Reduction Mean only: one value of the accumulation dtype on the device that divides the
  // summed terms instead of the counts of the rows they cover (a value <= 0 gives NaN), or null.
  // Without it, "mean" divides the cross-entropy by the labeled rows and the mimicry by the rows
  // mimicked (every row with mimic_unlabeled), each at least 1.
  const void* normalizer;
};

struct ScaleGradParams {
  void* grad;             // [K, R, C] contiguous
  // [K, R], accumulation dtype, any strides (in elements; both 0 for one value): row (k, r) is
  // multiplied by grad_loss[k, r], and left alone where that is 1.
  const void* grad_loss;
  int64_t grad_loss_stride_k;
  int64_t grad_loss_stride_r;
  int64_t K;
  int64_t R;
  int64_t C;
  DType dtype;
};

// Enqueue the work on `stream`; nothing synchronizes and nothing is read back on the host.
// The forward is one kernel (three for the split of few long rows, four for its divergences other
// than KL), whatever the reduction; the backward is one kernel. They return the error of any CUDA
// call made before the launches (a kernel attribute) or cudaErrorInvalidValue for missing scratch
// or ticket, or more than 2^31 - 1 classes; the caller checks the launches with
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).
// Empty problems launch nothing.
// Bytes of scratch the forward needs, for the same params (but workspace) and device.
int64_t mutual_loss_workspace_bytes(const MutualLossParams& params, const DeviceInfo& device);
cudaError_t launch_mutual_loss(const MutualLossParams& params, const DeviceInfo& device,
                               cudaStream_t stream);
cudaError_t launch_scale_grad(const ScaleGradParams& params, const DeviceInfo& device,
                              cudaStream_t stream);

}  // namespace gpu
}  // namespace fastdml
