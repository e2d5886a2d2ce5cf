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

// "mean" over at most this many rows: each block of the forward counts the rows itself; over
// more, a counting kernel runs first.
constexpr int64_t kMaxRowsCountedPerBlock = 2048;
// A reduced loss of at most this many peer rows (K * R) is added up by the forward's last block;
// a larger one by a kernel of its own, chunks of kRowsPerReduceChunk rows a block.
constexpr int64_t kMaxRowsReducedInForward = 65536;
constexpr int64_t kRowsPerReduceChunk = 16384;

// Where the forward's scratch lies in its workspace, in bytes. A reduced loss has two tickets
// (4 bytes each at 0 and 4: the blocks done, of the forward and of the reducing kernel) and the
// count of the rows (8 bytes at 8), all zeroed by the launcher, then its per-row terms [3][K][R]
// at `rows`, and, when a kernel of its own adds them up, that kernel's partial sums
// [K][reduce_chunks][2] at `reduce_partials`; the split forward has its partial statistics
// [R][chunks][K][kPartialValues] at `partials`.
// Values the split forward keeps per (row, chunk, peer): five statistics and four loss sums.
constexpr int64_t kPartialValues = 9;

struct WorkspaceLayout {
  bool count_first;       // a counting kernel runs first
  int64_t reduce_chunks;  // 0: the forward's last block adds the rows up
  int64_t rows;
  int64_t reduce_partials;
  int64_t partials;
  int64_t bytes;
};

inline WorkspaceLayout workspace_layout(const MutualLossParams& p, const DeviceInfo& device) {
  const int64_t acc = p.dtype == DType::Float64 ? 8 : 4;
  const bool reduced = p.reduction != LossReduction::None;
  const int64_t chunks = split_chunks(p, device);
  WorkspaceLayout w;
  w.count_first = p.reduction == LossReduction::Mean && p.R > kMaxRowsCountedPerBlock;
  w.reduce_chunks =
      reduced && p.K * p.R > kMaxRowsReducedInForward ? ceil_div(p.R, kRowsPerReduceChunk) : 0;
  w.rows = reduced ? 16 : 0;
  w.reduce_partials = w.rows + (reduced ? 3 * p.K * p.R * acc : 0);
  w.partials = w.reduce_partials + p.K * w.reduce_chunks * 2 * acc;
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
