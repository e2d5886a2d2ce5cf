// The C entry points that tests/test_cuda_emulation.py calls through ctypes: one call of
// launch_mutual_loss or launch_scale_grad (csrc/mutual_loss_cuda.h) on the emulated device, as the
// CUDA binding makes it. Every buffer is first copied to "device memory" with guard
// bytes on both sides and the caller's address modulo 256 (so vector alignment is the caller's);
// after the launch the driver checks that no kernel wrote outside its outputs or into its inputs.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>

#include "emulator.h"
#include "mutual_loss_cuda.h"

namespace {

using fastdml::gpu::DeviceInfo;
using fastdml::gpu::DType;
using fastdml::gpu::LossMode;

constexpr size_t kGuardBytes = 4096;  // a multiple of 256
constexpr unsigned char kGuard = 0xa5;
constexpr unsigned char kUnwritten = 0x5a;  // 1.5e16 as float: an output never written shows
constexpr unsigned char kPoison = 0xff;     // NaN: scratch read before it is written shows

// A caller's buffer on the emulated device.
class DeviceBuffer {
 public:
  // A copy of `bytes` bytes at `host` (when not null; else `fill` bytes), placed at `host`'s
  // address modulo 256.
  DeviceBuffer(const char* name, const void* host, size_t bytes, unsigned char fill)
      : name_(name), host_(host), bytes_(bytes) {
    const size_t offset = reinterpret_cast<uintptr_t>(host) % 256;
    storage_.reset(new unsigned char[bytes + 2 * kGuardBytes + offset + 256]);
    const auto address = reinterpret_cast<uintptr_t>(storage_.get());
    start_ = storage_.get() + (256 - address % 256) % 256;
    data_ = start_ + kGuardBytes + offset;
    std::memset(start_, kGuard, kGuardBytes + offset);
    std::memset(data_ + bytes, kGuard, kGuardBytes);
    if (host != nullptr) {
      std::memcpy(data_, host, bytes);
    } else {
      std::memset(data_, fill, bytes);
    }
  }

  void* data() const { return bytes_ > 0 ? data_ : nullptr; }

  // Why the kernels' use of it was wrong, or "" if it was not.
  std::string check(bool read_only) const {
    for (unsigned char* p = start_; p < data_; ++p) {
      if (*p != kGuard) return std::string("a kernel wrote before the start of ") + name_;
    }
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (data_[bytes_ + i] != kGuard) {
        return std::string("a kernel wrote past the end of ") + name_;
      }
    }
    if (read_only && host_ != nullptr && std::memcmp(data_, host_, bytes_) != 0) {
      return std::string("a kernel wrote into its input ") + name_;
    }
    return "";
  }

  void copy_to(void* host) const {
    if (host != nullptr) std::memcpy(host, data_, bytes_);
  }

 private:
  const char* name_;
  const void* host_;
  size_t bytes_;
  std::unique_ptr<unsigned char[]> storage_;
  unsigned char* start_;
  unsigned char* data_;
};

size_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Float16:
    case DType::BFloat16: return 2;
  }
  return 0;
}

size_t acc_bytes(DType dtype) { return dtype == DType::Float64 ? 8 : 4; }

int report(char* out, int64_t size, const std::string& message) {
  if (size > 0) std::snprintf(out, static_cast<size_t>(size), "%s", message.c_str());
  return 1;
}

// What went wrong in the launches (a launcher's return value, the last error, a kernel error).
std::string launch_problem(cudaError_t launched) {
  const cudaError_t last = cudaGetLastError();
  std::ostringstream out;
  if (launched != cudaSuccess) out << "the launcher returned CUDA error " << int(launched) << ". ";
  if (last != cudaSuccess) out << "cudaGetLastError: CUDA error " << int(last) << ". ";
  if (!cuda_emu::kernel_error().empty()) out << cuda_emu::kernel_error();
  return out.str();
}

// A fresh emulated device (no launches, no errors) as `device` describes it.
void configure(const DeviceInfo& device, int schedule) {
  cuda_emu::reset();
  cuda_emu::configure(device.num_sms, static_cast<size_t>(device.smem_per_sm),
                      static_cast<size_t>(device.smem_per_block_optin), device.clusters,
                      static_cast<cuda_emu::Schedule>(schedule));
}

}  // namespace

extern "C" {

// launch_mutual_loss on a device with `num_sms` multiprocessors, these shared memory sizes, and
// thread-block clusters if `clusters` is nonzero.
// logits: `logits_bytes` bytes from `logits` hold the [K, R, C] view (unit class stride, peer and
// row strides in elements); row_scale (null: none): `row_scale_bytes` bytes hold it, at these
// strides (0 and 0: one value). Outputs of the accumulation dtype: loss, ce, mimicry [K, R] for
// reduction None, else loss [1] and ce, mimicry [K]; grad [K, R, C] contiguous of the logits
// dtype (null unless compute_grad). The loss family as MutualLossParams takes it: divergence
// (LossDivergence; "jsd" at beta 0 or 1 comes as the KL or reverse KL it is), beta, ce_weight,
// mimic_unlabeled, and normalizer (null: none; else one value of the accumulation dtype, reduction
// Mean only). Returns 0, or 1 with a message in `error`.
int emu_mutual_loss(const void* logits, int64_t logits_bytes, int64_t stride_k, int64_t stride_r,
                    const int64_t* target, int64_t target_stride, const void* weights,
                    const void* row_scale, int64_t row_scale_bytes, int64_t row_scale_stride_k,
                    int64_t row_scale_stride_r, void* loss, void* ce, void* mimicry, void* grad,
                    int64_t K, int64_t R, int64_t C, int dtype, int mode, int reduction,
                    double temperature, double alpha, double label_smoothing,
                    int64_t ignore_index, int compute_grad, int divergence, double beta,
                    double ce_weight, int mimic_unlabeled, const void* normalizer, int num_sms,
                    int smem_per_sm, int smem_per_block_optin, int clusters, int schedule,
                    char* error, int64_t error_size) {
  const DeviceInfo device{num_sms, smem_per_sm, smem_per_block_optin, clusters != 0};
  configure(device, schedule);
  const auto type = static_cast<DType>(dtype);
  const size_t acc = acc_bytes(type);
  const size_t rows = static_cast<size_t>(K * R);
  const auto reduced = static_cast<fastdml::gpu::LossReduction>(reduction);
  const size_t losses = reduced == fastdml::gpu::LossReduction::None ? rows : 1;
  const size_t terms = reduced == fastdml::gpu::LossReduction::None ? rows : size_t(K);
  DeviceBuffer d_logits("logits", logits, static_cast<size_t>(logits_bytes), 0);
  DeviceBuffer d_target("target", target,
                        static_cast<size_t>(R > 0 ? (R - 1) * target_stride + 1 : 0) * 8, 0);
  DeviceBuffer d_weights("weights", weights, static_cast<size_t>(K * K) * acc, 0);
  DeviceBuffer d_row_scale("row_scale", row_scale, static_cast<size_t>(row_scale_bytes), 0);
  DeviceBuffer d_normalizer("normalizer", normalizer, normalizer != nullptr ? acc : 0, 0);
  DeviceBuffer d_loss("loss", nullptr, losses * acc, kUnwritten);
  DeviceBuffer d_ce("ce", nullptr, terms * acc, kUnwritten);
  DeviceBuffer d_mimicry("mimicry", nullptr, terms * acc, kUnwritten);
  DeviceBuffer d_grad("grad", nullptr, compute_grad ? rows * C * dtype_bytes(type) : 0,
                      kUnwritten);

  fastdml::gpu::MutualLossParams params{};
  params.logits = d_logits.data();
  params.stride_k = stride_k;
  params.stride_r = stride_r;
  params.target = static_cast<const int64_t*>(d_target.data());
  params.target_stride = target_stride;
  // As the binding: no weights outside mode Weights, so that a read of them faults.
  params.weights = static_cast<LossMode>(mode) == LossMode::Weights ? d_weights.data() : nullptr;
  params.row_scale = row_scale != nullptr ? d_row_scale.data() : nullptr;
  params.row_scale_stride_k = row_scale_stride_k;
  params.row_scale_stride_r = row_scale_stride_r;
  params.loss = d_loss.data();
  params.ce = d_ce.data();
  params.mimicry = d_mimicry.data();
  params.grad = compute_grad ? d_grad.data() : nullptr;
  params.K = K;
  params.R = R;
  params.C = C;
  params.dtype = type;
  params.mode = static_cast<LossMode>(mode);
  params.reduction = reduced;
  params.temperature = temperature;
  params.alpha = alpha;
  params.label_smoothing = label_smoothing;
  params.ignore_index = ignore_index;
  params.compute_grad = compute_grad != 0;
  params.divergence = static_cast<fastdml::gpu::LossDivergence>(divergence);
  params.beta = beta;
  params.ce_weight = ce_weight;
  params.mimic_unlabeled = mimic_unlabeled != 0;
  params.normalizer = d_normalizer.data();
  const int64_t workspace_bytes = fastdml::gpu::mutual_loss_workspace_bytes(params, device);
  DeviceBuffer d_workspace("workspace", nullptr, static_cast<size_t>(workspace_bytes), kPoison);
  params.workspace = d_workspace.data();
  // As the binding's: zero before the forward, and it must be left zero for the next one.
  const bool has_ticket = reduced != fastdml::gpu::LossReduction::None;
  DeviceBuffer d_ticket("ticket", nullptr, has_ticket ? sizeof(unsigned) : 0, 0);
  params.ticket = static_cast<unsigned*>(d_ticket.data());

  const cudaError_t launched = fastdml::gpu::launch_mutual_loss(params, device, nullptr);
  std::string problem = launch_problem(launched);
  for (const auto& [buffer, read_only] :
       {std::pair{&d_logits, true}, {&d_target, true}, {&d_weights, true}, {&d_row_scale, true},
        {&d_normalizer, true}, {&d_loss, false}, {&d_ce, false}, {&d_mimicry, false},
        {&d_grad, false}, {&d_workspace, false}, {&d_ticket, false}}) {
    if (problem.empty()) problem = buffer->check(read_only);
  }
  unsigned ticket = 0;
  d_ticket.copy_to(has_ticket ? &ticket : nullptr);
  if (problem.empty() && ticket != 0) {
    problem = "the forward left its ticket at " + std::to_string(ticket) + ", not 0";
  }
  if (!problem.empty()) return report(error, error_size, problem);
  d_loss.copy_to(loss);
  d_ce.copy_to(ce);
  d_mimicry.copy_to(mimicry);
  if (compute_grad) d_grad.copy_to(grad);
  return 0;
}

// launch_scale_grad on grad [K, R, C] (contiguous, updated in place) with grad_loss [K, R]
// (strides in elements, 0 and 0 for one value; `grad_loss_bytes` bytes from `grad_loss` hold it).
// Returns as above.
int emu_scale_grad(void* grad, const void* grad_loss, int64_t grad_loss_bytes,
                   int64_t grad_loss_stride_k, int64_t grad_loss_stride_r, int64_t K, int64_t R,
                   int64_t C, int dtype, int num_sms, int smem_per_sm, int smem_per_block_optin,
                   int clusters, int schedule, char* error, int64_t error_size) {
  const DeviceInfo device{num_sms, smem_per_sm, smem_per_block_optin, clusters != 0};
  configure(device, schedule);
  const auto type = static_cast<DType>(dtype);
  DeviceBuffer d_grad("grad", grad, static_cast<size_t>(K * R * C) * dtype_bytes(type), 0);
  DeviceBuffer d_grad_loss("grad_loss", grad_loss, static_cast<size_t>(grad_loss_bytes), 0);
  fastdml::gpu::ScaleGradParams params{};
  params.grad = d_grad.data();
  params.grad_loss = d_grad_loss.data();
  params.grad_loss_stride_k = grad_loss_stride_k;
  params.grad_loss_stride_r = grad_loss_stride_r;
  params.K = K;
  params.R = R;
  params.C = C;
  params.dtype = type;
  const cudaError_t launched = fastdml::gpu::launch_scale_grad(params, device, nullptr);
  std::string problem = launch_problem(launched);
  for (const auto& [buffer, read_only] : {std::pair{&d_grad, false}, {&d_grad_loss, true}}) {
    if (problem.empty()) problem = buffer->check(read_only);
  }
  if (!problem.empty()) return report(error, error_size, problem);
  d_grad.copy_to(grad);
  return 0;
}

// The launches of the last call, one line each: kernel, launcher, grid (x y z), block (x y z),
// blocks per cluster, dynamic and static shared bytes, __syncthreads, cluster barrier, __syncwarp
// and shuffle episodes; tab-separated.
// Returns the length of the whole text (written up to `size` - 1 bytes).
int64_t emu_launches(char* out, int64_t size) {
  std::ostringstream text;
  for (const cuda_emu::LaunchRecord& r : cuda_emu::launches()) {
    text << r.kernel << '\t' << r.where << '\t' << r.grid.x << ' ' << r.grid.y << ' ' << r.grid.z
         << '\t' << r.block.x << ' ' << r.block.y << ' ' << r.block.z << '\t' << r.cluster
         << '\t' << r.dynamic_shared_bytes << '\t' << r.static_shared_bytes << '\t'
         << r.block_barriers << '\t' << r.cluster_barriers << '\t' << r.warp_barriers << '\t'
         << r.shuffles << '\n';
  }
  const std::string s = text.str();
  if (size > 0) std::snprintf(out, static_cast<size_t>(size), "%s", s.c_str());
  return static_cast<int64_t>(s.size());
}

}  // extern "C"
