// CUDA binding of fastdml::mutual_loss_with_grad and fastdml::scale_grad_rows_ (schemas in
// ops.cpp): argument checks shared with the CPU op (mutual_loss.h), the output tensors, and the
// launches of mutual_loss_cuda_api.cu on the current stream. Nothing here waits for the device:
// row_scale (0-dim, or [K, R] at any strides) and the targets are read by the kernels only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <tuple>
#include <vector>

#include "mutual_loss.h"
#include "mutual_loss_cuda.h"

namespace fastdml {
namespace {

// Beyond 8 peers the statistics of a row live in shared memory, K * 72 bytes of it at most.
constexpr int64_t kMaxPeers = 1024;

gpu::DType gpu_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return gpu::DType::Float32;
    case at::kDouble: return gpu::DType::Float64;
    case at::kHalf: return gpu::DType::Float16;
    case at::kBFloat16: return gpu::DType::BFloat16;
    default: TORCH_CHECK(false, "fastdml: no CUDA kernel for dtype ", dtype);
  }
}

gpu::LossMode gpu_mode(Mode mode) {
  switch (mode) {
    case Mode::Pairwise: return gpu::LossMode::Pairwise;
    case Mode::Ensemble: return gpu::LossMode::Ensemble;
    case Mode::EnsembleLogits: return gpu::LossMode::EnsembleLogits;
    case Mode::Weights: return gpu::LossMode::Weights;
  }
  TORCH_CHECK(false, "fastdml: unknown mode");
}

// Of the current device: its properties are read from the driver on the first launch there and
// cached (no driver call per launch). Not torch's cache (ATen/cuda/CUDAContextLight.h), whose
// header needs those of cuBLAS and cuSPARSE.
gpu::DeviceInfo device_info() {
  struct Entry {
    std::once_flag once;
    gpu::DeviceInfo info;
  };
  static std::vector<Entry> cache(static_cast<size_t>(c10::cuda::device_count()));
  const c10::DeviceIndex device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && static_cast<size_t>(device) < cache.size(),
              "fastdml: CUDA device index ", static_cast<int>(device), " out of range");
  Entry& entry = cache[static_cast<size_t>(device)];
  // A failed query throws and leaves the flag unset, so the next launch asks again.
  std::call_once(entry.once, [&] {
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    entry.info = {prop.multiProcessorCount, static_cast<int>(prop.sharedMemPerMultiprocessor),
                  static_cast<int>(prop.sharedMemPerBlockOptin)};
  });
  return entry.info;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastdml: the CUDA op needs ", name, " on a CUDA device, got ",
              t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mutual_loss_with_grad_cuda(
    const at::Tensor& logits_in, const at::Tensor& target, const at::Tensor& weights_in,
    const at::Tensor& row_scale, c10::string_view mode_name, double temperature, double alpha,
    double label_smoothing, int64_t ignore_index, bool compute_grad) {
  const Mode mode = parse_mode(mode_name);
  check_with_grad_args(logits_in, target, weights_in, row_scale, temperature, label_smoothing);
  check_cuda(logits_in, "logits");
  const int64_t K = logits_in.size(0), R = logits_in.size(1), C = logits_in.size(2);
  TORCH_CHECK(K <= kMaxPeers, "fastdml: the CUDA op supports up to ", kMaxPeers,
              " peers, got K = ", K);
  const c10::cuda::CUDAGuard guard(logits_in.device());

  // The kernels need unit class stride (any peer and row strides); they never write the logits.
  const at::Tensor logits = logits_in.stride(2) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor weights = mode == Mode::Weights ? weights_in.contiguous() : weights_in;
  const auto acc_options = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({K, R}, acc_options);
  at::Tensor ce = at::empty({K, R}, acc_options);
  at::Tensor mimicry = at::empty({K, R}, acc_options);
  at::Tensor grad = compute_grad ? at::empty({K, R, C}, logits.options())
                                 : at::empty({0}, logits.options());

  gpu::MutualLossParams params{};
  params.logits = logits.const_data_ptr();
  params.stride_k = logits.stride(0);
  params.stride_r = logits.stride(1);
  params.target = target.const_data_ptr<int64_t>();
  params.target_stride = target.stride(0);
  params.weights = weights.const_data_ptr();
  params.row_scale = row_scale.const_data_ptr();
  std::tie(params.row_scale_stride_k, params.row_scale_stride_r) = row_scale_strides(row_scale);
  params.loss = loss.mutable_data_ptr();
  params.ce = ce.mutable_data_ptr();
  params.mimicry = mimicry.mutable_data_ptr();
  params.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  params.K = K;
  params.R = R;
  params.C = C;
  params.dtype = gpu_dtype(logits.scalar_type());
  params.mode = gpu_mode(mode);
  params.temperature = temperature;
  params.alpha = alpha;
  params.label_smoothing = label_smoothing;
  params.ignore_index = ignore_index;
  params.compute_grad = compute_grad;
  const gpu::DeviceInfo device = device_info();
  // Scratch of the split forward (few long rows), freed into the stream's pool after the launch.
  const int64_t workspace_bytes = gpu::mutual_loss_workspace_bytes(params, device);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({workspace_bytes}, logits.options().dtype(at::kByte));
    params.workspace = workspace.mutable_data_ptr();
  }
  if (R > 0) {
    C10_CUDA_CHECK(gpu::launch_mutual_loss_with_grad(params, device,
                                                     c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {loss, ce, mimicry, grad};
}

void scale_grad_rows_cuda(const at::Tensor& grad, const at::Tensor& grad_loss,
                          const at::Tensor& row_scale) {
  check_scale_grad_args(grad, grad_loss, row_scale);
  check_cuda(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  gpu::ScaleGradParams params{};
  params.grad = grad.mutable_data_ptr();
  params.grad_loss = grad_loss.const_data_ptr();
  params.grad_loss_stride_k = grad_loss.stride(0);
  params.grad_loss_stride_r = grad_loss.stride(1);
  params.row_scale = row_scale.const_data_ptr();
  std::tie(params.row_scale_stride_k, params.row_scale_stride_r) = row_scale_strides(row_scale);
  params.K = grad.size(0);
  params.R = grad.size(1);
  params.C = grad.size(2);
  params.dtype = gpu_dtype(grad.scalar_type());
  if (grad.numel() > 0) {
    C10_CUDA_CHECK(
        gpu::launch_scale_grad_rows(params, device_info(), c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdml, CUDA, m) {
  m.impl("mutual_loss_with_grad", &mutual_loss_with_grad_cuda);
  m.impl("scale_grad_rows_", &scale_grad_rows_cuda);
}

}  // namespace fastdml
