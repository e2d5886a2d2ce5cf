// The per-dtype launchers of the CUDA kernels (defined in mutual_loss_cuda_kernels.cuh, explicitly
// instantiated for one logits dtype S in each mutual_loss_cuda_<dtype>.cu) and the host helpers
// that the public entry points (mutual_loss_cuda_api.cu) share with them. No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "mutual_loss_cuda.h"

namespace fastdml {
namespace gpu {
namespace detail {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Chunks per row for the split forward (1: no split): when the rows are fewer than the
// multiprocessors, about two blocks per multiprocessor, each of at least kMinChunk classes.
inline int64_t split_chunks(const MutualLossParams& p, const DeviceInfo& device) {
  constexpr int64_t kMinChunk = 4096;
  if (p.R <= 0 || p.R >= device.num_sms || p.C < 2 * kMinChunk) return 1;
  return std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(2 * int64_t(device.num_sms), p.R), p.C / kMinChunk));
}

// Whether the loss family's options are other than their defaults (the paper's loss): those
// take the any-K kernels.
inline bool family_options(const MutualLossParams& p) {
  return p.divergence != LossDivergence::KL || p.ce_weight != 1.0 || p.mimic_unlabeled ||
         p.normalizer != nullptr;
}

// The forward's grids are at most this many blocks per multiprocessor (the blocks a device holds
// at once, or fewer): each block counts the rows of a "mean" itself, and a reduced loss keeps a
// partial sum per block.
constexpr int kMaxBlocksPerSm = 4;

// Values the split forward keeps per (row, chunk, peer): five statistics and four loss sums.
constexpr int64_t kPartialValues = 9;

// Where the forward's scratch lies in its workspace, in bytes: a reduced loss's per-block sums
// [blocks][K][2] at `block_sums`, then the split forward's partial statistics
// [R][chunks][K][kPartialValues] at `partials`.
struct WorkspaceLayout {
  int64_t block_sums;
  int64_t partials;
  int64_t bytes;
};

inline WorkspaceLayout workspace_layout(const MutualLossParams& p, const DeviceInfo& device) {
  const int64_t acc = p.dtype == DType::Float64 ? 8 : 4;
  const bool reduced = p.reduction != LossReduction::None;
  const int64_t chunks = split_chunks(p, device);
  WorkspaceLayout w;
  w.block_sums = 0;
  w.partials = reduced ? int64_t(device.num_sms) * kMaxBlocksPerSm * p.K * 2 * acc : 0;
  w.bytes = w.partials + (chunks > 1 ? p.R * chunks * p.K * kPartialValues * acc : 0);
  return w;
}

// S: float, double, __half or __nv_bfloat16. Same contracts as launch_mutual_loss and
// launch_scale_grad, for non-empty problems.
template <typename S>
cudaError_t launch_forward(const MutualLossParams& p, const DeviceInfo& device,
                           cudaStream_t stream);
template <typename S>
cudaError_t launch_scale(const ScaleGradParams& p, const DeviceInfo& device, cudaStream_t stream);

}  // namespace detail
}  // namespace gpu
}  // namespace fastdml
