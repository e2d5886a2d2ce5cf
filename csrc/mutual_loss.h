// Shared by every backend of the fastdml mutual-loss ops: the mode names and the argument checks,
// so each device binding rejects the same inputs with the same messages before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

namespace fastdml {

enum class Mode { Pairwise, Ensemble, EnsembleLogits, Weights };

inline Mode parse_mode(c10::string_view mode) {
  if (mode == "pairwise") return Mode::Pairwise;
  if (mode == "ensemble") return Mode::Ensemble;
  if (mode == "ensemble_logits") return Mode::EnsembleLogits;
  if (mode == "weights") return Mode::Weights;
  TORCH_CHECK(false, "fastdml: unknown mode '", mode,
              "' (expected pairwise, ensemble, ensemble_logits or weights)");
}

enum class Reduction { Mean, Sum, None };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK(false, "fastdml: unknown reduction '", reduction,
                    "' (expected mean, sum or none)");
}

// D(t, q_k) in peer k's mimicry (docs/design.md, Other divergences): KL(t || q_k), KL(q_k || t),
// or the generalized Jensen-Shannon divergence of weight beta.
enum class Divergence { KL, ReverseKL, JSD };

inline Divergence parse_divergence(c10::string_view divergence) {
  if (divergence == "kl") return Divergence::KL;
  if (divergence == "reverse_kl") return Divergence::ReverseKL;
  if (divergence == "jsd") return Divergence::JSD;
  TORCH_CHECK_VALUE(false, "fastdml: unknown divergence '", divergence,
                    "' (expected kl, reverse_kl or jsd)");
}

// "jsd" at beta 0 and 1 is defined as the KL and the reverse KL (docs/loss.md), where its formula
// gives 0: the kernels compute those as such.
inline Divergence computed_divergence(Divergence divergence, double beta) {
  if (divergence != Divergence::JSD) return divergence;
  if (beta == 0) return Divergence::KL;
  return beta == 1 ? Divergence::ReverseKL : Divergence::JSD;
}

// Losses, statistics and gradients are accumulated in float64 for float64 logits, else float32.
inline at::ScalarType acc_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& logits, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), "fastdml: ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
}

inline void check_acc_tensor(const at::Tensor& logits, const at::Tensor& t, const char* name,
                             at::IntArrayRef shape) {
  check_same_device(logits, t, name);
  TORCH_CHECK(t.sizes() == shape, "fastdml: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == acc_dtype(logits.scalar_type()), "fastdml: ", name,
              " must be ", acc_dtype(logits.scalar_type()), " for ", logits.scalar_type(),
              " logits, got ", t.scalar_type());
}

// A [K, R, C] tensor of logits (or of their gradient) in one of the supported dtypes.
inline void check_logits_like(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "fastdml: ", name, " must be [K, R, C], got ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "fastdml: ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// The logits, the target and the scalar options every loss op takes.
inline void check_loss_args(const at::Tensor& logits, const at::Tensor& target,
                            double temperature, double label_smoothing) {
  check_logits_like(logits, "logits");
  const int64_t K = logits.size(0), R = logits.size(1), C = logits.size(2);
  TORCH_CHECK(K >= 2, "fastdml: mutual learning needs at least 2 peers, got K = ", K);
  TORCH_CHECK(C >= 1, "fastdml: logits need at least one class");
  check_same_device(logits, target, "target");
  TORCH_CHECK(target.scalar_type() == at::kLong, "fastdml: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == R, "fastdml: target must have shape [", R,
              "], got ", target.sizes());
  TORCH_CHECK(temperature > 0, "fastdml: temperature must be positive, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "fastdml: label_smoothing must be in [0, 1], got ", label_smoothing);
}

// grad_scale of fused_mutual_loss: one value (0-dim) or one per peer and row ([K, R], any
// strides: an expanded or transposed view will do), of the accumulation dtype on the logits'
// device (on CUDA read by the kernels, never on the host).
inline void check_grad_scale(const at::Tensor& logits, const at::Tensor& grad_scale) {
  check_same_device(logits, grad_scale, "grad_scale");
  const int64_t K = logits.size(0), R = logits.size(1);
  TORCH_CHECK(grad_scale.dim() == 0 || grad_scale.sizes() == at::IntArrayRef({K, R}),
              "fastdml: grad_scale must be 0-dim or have shape [", K, ", ", R,
              "] (one value per peer and row), got ", grad_scale.sizes());
  TORCH_CHECK(grad_scale.scalar_type() == acc_dtype(logits.scalar_type()),
              "fastdml: grad_scale must be ", acc_dtype(logits.scalar_type()), " for ",
              logits.scalar_type(), " logits, got ", grad_scale.scalar_type());
}

// The element strides of a grad_scale (or grad_loss) over peers and over rows: 0 and 0 for a
// 0-dim one.
inline std::pair<int64_t, int64_t> row_strides(const at::Tensor& t) {
  if (t.dim() == 0) return {0, 0};
  return {t.stride(0), t.stride(1)};
}

// The loss family's options of fused_mutual_loss. The normalizer is a 0-dim real tensor (an int64
// count will do) on the logits' device, where a kernel can read it without a host sync. Its value
// must be > 0: the CPU op checks that as it reads it on the host.
inline void check_family_args(const at::Tensor& logits, double beta, double ce_weight,
                              const std::optional<at::Tensor>& normalizer, Reduction reduction) {
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "fastdml: beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(ce_weight) && ce_weight >= 0,
                    "fastdml: ce_weight must be a finite number >= 0, got ", ce_weight);
  if (!normalizer.has_value()) return;
  TORCH_CHECK_VALUE(reduction == Reduction::Mean,
                    "fastdml: normalizer divides the loss of reduction 'mean' only");
  check_same_device(logits, *normalizer, "normalizer");
  const auto dtype = normalizer->scalar_type();
  TORCH_CHECK_VALUE(normalizer->dim() == 0 && dtype != at::kBool && !c10::isComplexType(dtype),
                    "fastdml: normalizer must be a 0-dim real tensor, got shape ",
                    normalizer->sizes(), " and dtype ", dtype);
}

// fused_mutual_loss: weights [K, K] in mode "weights" (unread, and may be absent, in the
// others); grad_scale absent, 0-dim or [K, R] (any strides; 0-dim for a reduced loss).
inline void check_fused_args(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weights,
                             const std::optional<at::Tensor>& grad_scale, Mode mode,
                             double temperature, double alpha, double label_smoothing,
                             Reduction reduction, double beta, double ce_weight,
                             const std::optional<at::Tensor>& normalizer) {
  check_loss_args(logits, target, temperature, label_smoothing);
  if (mode == Mode::Weights) {
    TORCH_CHECK(weights.has_value(), "fastdml: mode 'weights' needs the [K, K] weights");
    check_acc_tensor(logits, *weights, "weights", {logits.size(0), logits.size(0)});
  }
  TORCH_CHECK(alpha >= 0, "fastdml: alpha must be >= 0, got ", alpha);
  if (grad_scale.has_value()) {
    check_grad_scale(logits, *grad_scale);
    TORCH_CHECK(reduction == Reduction::None || grad_scale->dim() == 0,
                      "fastdml: grad_scale must be 0-dim for a reduced loss");
  }
  check_family_args(logits, beta, ce_weight, normalizer, reduction);
}

// scale_grad_: grad [K, R, C] contiguous; grad_loss 0-dim or [K, R] (any strides) in its
// accumulation dtype on its device.
inline void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& grad_loss) {
  check_logits_like(grad, "grad");
  TORCH_CHECK(grad.is_contiguous(), "fastdml: grad must be contiguous");
  check_same_device(grad, grad_loss, "grad_loss");
  TORCH_CHECK(grad_loss.dim() == 0 ||
                  grad_loss.sizes() == at::IntArrayRef({grad.size(0), grad.size(1)}),
              "fastdml: grad_loss must be 0-dim or [K, R], got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == acc_dtype(grad.scalar_type()), "fastdml: grad_loss must be ",
              acc_dtype(grad.scalar_type()), ", got ", grad_loss.scalar_type());
}

}  // namespace fastdml
