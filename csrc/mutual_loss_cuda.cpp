// CUDA binding of fastdml::fused_mutual_loss and fastdml::scale_grad_ (schemas in ops.cpp; their
// autograd, shared with the CPU op, in mutual_loss_autograd.cpp): argument checks shared with the
// CPU op (mutual_loss.h), the output tensors, and the launches of mutual_loss_cuda_api.cu on the
// current stream. Nothing here waits for the device: the targets, grad_scale, grad_loss and the
// normalizer are read by the kernels only (a target out of range gives NaN in its row, and a
// normalizer that is not positive a NaN loss, not an error), and a reduced loss is reduced on the
// device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "mutual_loss.h"
#include "mutual_loss_cuda.h"

namespace fastdml {
namespace {

// Beyond 8 peers the statistics of a row live in shared memory, K * 104 bytes of it at most
// (float64). A GPU that gives a block less refuses the launch (cudaErrorInvalidValue): beyond
// about 970 float64 peers on sm_86 and sm_89 (99 KiB a block).
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

gpu::LossReduction gpu_reduction(Reduction reduction) {
  switch (reduction) {
    case Reduction::None: return gpu::LossReduction::None;
    case Reduction::Sum: return gpu::LossReduction::Sum;
    case Reduction::Mean: return gpu::LossReduction::Mean;
  }
  TORCH_CHECK(false, "fastdml: unknown reduction");
}

gpu::LossDivergence gpu_divergence(Divergence divergence) {
  switch (divergence) {
    case Divergence::KL: return gpu::LossDivergence::KL;
    case Divergence::ReverseKL: return gpu::LossDivergence::ReverseKL;
    case Divergence::JSD: return gpu::LossDivergence::JSD;
  }
  TORCH_CHECK(false, "fastdml: unknown divergence");
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
                  static_cast<int>(prop.sharedMemPerBlockOptin), prop.clusterLaunch != 0};
  });
  return entry.info;
}

// The forward's ticket (MutualLossParams::ticket) on `stream`. Eager launches share one counter
// per device and stream, allocated outside torch's allocator and zeroed once, on that stream:
// every forward leaves it zero, and forwards on one stream run one after another. A launch being
// captured into a CUDA graph gets a counter of its own in `scratch`, zeroed by a memset the graph
// holds, so that the graph is whole whichever stream replays it, and however often.
unsigned* forward_ticket(cudaStream_t stream, at::Tensor& scratch,
                         const at::TensorOptions& bytes) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    scratch = at::empty({static_cast<int64_t>(sizeof(unsigned))}, bytes);
    auto* const ticket = static_cast<unsigned*>(scratch.mutable_data_ptr());
    C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned), stream));
    return ticket;
  }
  static std::mutex mutex;
  static auto& tickets = *new std::map<std::pair<int, cudaStream_t>, unsigned*>();
  const std::lock_guard<std::mutex> lock(mutex);
  unsigned*& ticket = tickets[{static_cast<int>(c10::cuda::current_device()), stream}];
  if (ticket == nullptr) {
    void* memory = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&memory, sizeof(unsigned)));
    C10_CUDA_CHECK(cudaMemsetAsync(memory, 0, sizeof(unsigned), stream));
    ticket = static_cast<unsigned*>(memory);
  }
  return ticket;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastdml: the CUDA op needs ", name, " on a CUDA device, got ",
              t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_mutual_loss_cuda(
    const at::Tensor& logits_in, const at::Tensor& target,
    const std::optional<at::Tensor>& weights_in, const std::optional<at::Tensor>& grad_scale,
    c10::string_view mode_name, double temperature, double alpha, double label_smoothing,
    int64_t ignore_index, c10::string_view reduction_name, bool compute_grad,
    c10::string_view divergence_name, double beta, double ce_weight, bool mimic_unlabeled,
    const std::optional<at::Tensor>& normalizer) {
  const Mode mode = parse_mode(mode_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const Divergence divergence = computed_divergence(parse_divergence(divergence_name), beta);
  check_fused_args(logits_in, target, weights_in, grad_scale, mode, temperature, alpha,
                   label_smoothing, reduction, beta, ce_weight, normalizer);
  check_cuda(logits_in, "logits");
  const int64_t K = logits_in.size(0), R = logits_in.size(1), C = logits_in.size(2);
  TORCH_CHECK(K <= kMaxPeers, "fastdml: the CUDA op supports up to ", kMaxPeers,
              " peers, got K = ", K);
  const c10::cuda::CUDAGuard guard(logits_in.device());

  // The kernels need unit class stride (any peer and row strides); they never write the logits.
  const at::Tensor logits = logits_in.stride(2) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor weights = mode == Mode::Weights ? weights_in->contiguous() : at::Tensor();
  const auto acc_options = logits.options().dtype(acc_dtype(logits.scalar_type()));
  // Any real dtype will do (an int64 token count): converted on the device, not read here.
  const at::Tensor normalizer_acc =
      normalizer.has_value() ? normalizer->to(acc_options) : at::Tensor();
  const bool reduced = reduction != Reduction::None;
  const std::vector<int64_t> rows_shape = {K, R};
  at::Tensor loss = at::empty(reduced ? std::vector<int64_t>{} : rows_shape, acc_options);
  at::Tensor ce = at::empty(reduced ? std::vector<int64_t>{K} : rows_shape, acc_options);
  at::Tensor mimicry = at::empty_like(ce);
  if (reduced && R == 0) {  // no rows to add up: a loss of 0
    loss.zero_();
    ce.zero_();
    mimicry.zero_();
  }
  at::Tensor grad = at::empty(compute_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options());

  gpu::MutualLossParams params{};
  params.logits = logits.const_data_ptr();
  params.stride_k = logits.stride(0);
  params.stride_r = logits.stride(1);
  params.target = target.const_data_ptr<int64_t>();
  params.target_stride = target.stride(0);
  params.weights = weights.defined() ? weights.const_data_ptr() : nullptr;
  if (grad_scale.has_value()) {
    params.row_scale = grad_scale->const_data_ptr();
    std::tie(params.row_scale_stride_k, params.row_scale_stride_r) =
        row_strides(*grad_scale);
  }
  params.loss = loss.mutable_data_ptr();
  params.ce = ce.mutable_data_ptr();
  params.mimicry = mimicry.mutable_data_ptr();
  params.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  params.K = K;
  params.R = R;
  params.C = C;
  params.dtype = gpu_dtype(logits.scalar_type());
  params.mode = gpu_mode(mode);
  params.reduction = gpu_reduction(reduction);
  params.temperature = temperature;
  params.alpha = alpha;
  params.label_smoothing = label_smoothing;
  params.ignore_index = ignore_index;
  params.compute_grad = compute_grad;
  params.divergence = gpu_divergence(divergence);
  params.beta = beta;
  params.ce_weight = ce_weight;
  params.mimic_unlabeled = mimic_unlabeled;
  params.normalizer = normalizer_acc.defined() ? normalizer_acc.const_data_ptr() : nullptr;
  const gpu::DeviceInfo device = device_info();
  // Scratch (a reduced loss's per-block sums, the split's partials), freed into the stream's pool
  // after the launch.
  const int64_t workspace_bytes = gpu::mutual_loss_workspace_bytes(params, device);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({workspace_bytes}, logits.options().dtype(at::kByte));
    params.workspace = workspace.mutable_data_ptr();
  }
  if (R > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor ticket_scratch;
    if (reduced) {
      params.ticket = forward_ticket(stream, ticket_scratch, logits.options().dtype(at::kByte));
    }
    C10_CUDA_CHECK(gpu::launch_mutual_loss(params, device, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {loss, ce, mimicry, grad};
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& grad_loss) {
  check_scale_grad_args(grad, grad_loss);
  check_cuda(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  gpu::ScaleGradParams params{};
  params.grad = grad.mutable_data_ptr();
  params.grad_loss = grad_loss.const_data_ptr();
  std::tie(params.grad_loss_stride_k, params.grad_loss_stride_r) = row_strides(grad_loss);
  params.K = grad.size(0);
  params.R = grad.size(1);
  params.C = grad.size(2);
  params.dtype = gpu_dtype(grad.scalar_type());
  if (grad.numel() > 0) {
    C10_CUDA_CHECK(
        gpu::launch_scale_grad(params, device_info(), c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdml, CUDA, m) {
  m.impl("fused_mutual_loss", &fused_mutual_loss_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace fastdml
