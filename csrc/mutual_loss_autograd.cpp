// Autograd of fastdml::fused_mutual_loss, in C++ so that a training step's loss costs the
// dispatcher and the autograd engine their usual few microseconds and no Python.
//
// The forward already wrote the gradient of its (reduced) loss, so the backward hands that buffer
// to autograd, rescaled in place by the upstream gradient only where it is not 1: the op's
// `grad` output is the op's own (a caller who wants the forward's gradient as it was copies it).
// Where that buffer is not the loss's gradient as written, the backward computes the gradient
// again with the upstream gradient as grad_scale: float16 logits (whose gradient must take the
// upstream gradient before its cast), a forward given a grad_scale, a second backward through a
// retained graph (which finds the buffer handed out already), or a buffer changed since (its
// version counter moved).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastdml {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

using FusedSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    c10::string_view, double, double, double, int64_t, c10::string_view, bool, c10::string_view,
    double, double, bool, const std::optional<Tensor>&);

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_mutual_loss(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& grad_scale, c10::string_view mode, double temperature,
    double alpha, double label_smoothing, int64_t ignore_index, c10::string_view reduction,
    bool compute_grad, c10::string_view divergence, double beta, double ce_weight,
    bool mimic_unlabeled, const std::optional<Tensor>& normalizer) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastdml::fused_mutual_loss", "")
                             .typed<FusedSignature>();
  return op.call(logits, target, weights, grad_scale, mode, temperature, alpha, label_smoothing,
                 ignore_index, reduction, compute_grad, divergence, beta, ce_weight,
                 mimic_unlabeled, normalizer);
}

void scale_grad_(Tensor& grad, const Tensor& grad_loss) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastdml::scale_grad_", "")
                             .typed<void(Tensor&, const Tensor&)>();
  op.call(grad, grad_loss);
}

std::optional<Tensor> optional_tensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

class FusedMutualLoss : public torch::autograd::Function<FusedMutualLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               const std::optional<Tensor>& weights,
                               const std::optional<Tensor>& grad_scale, c10::string_view mode,
                               double temperature, double alpha, double label_smoothing,
                               int64_t ignore_index, c10::string_view reduction,
                               bool compute_grad, c10::string_view divergence, double beta,
                               double ce_weight, bool mimic_unlabeled,
                               const std::optional<Tensor>& normalizer) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, ce, mimicry, grad] = fused_mutual_loss(
        logits, target, weights, grad_scale, mode, temperature, alpha, label_smoothing,
        ignore_index, reduction, compute_grad, divergence, beta, ce_weight, mimic_unlabeled,
        normalizer);
    ctx->save_for_backward(
        {logits, target, weights.value_or(Tensor()), normalizer.value_or(Tensor())});
    // The gradient buffer belongs to the op (the caller's logits are never written): the first
    // backward rescales it in place and hands it to autograd, so it stays out of
    // save_for_backward's version checks; its own version is checked instead.
    const bool reusable = !grad_scale.has_value() && logits.scalar_type() != at::kHalf;
    ctx->saved_data["grad"] = reusable ? grad : Tensor();
    ctx->saved_data["grad_version"] = static_cast<int64_t>(grad._version());
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["divergence"] = std::string(divergence);
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["ce_weight"] = ce_weight;
    ctx->saved_data["mimic_unlabeled"] = mimic_unlabeled;
    ctx->mark_non_differentiable({ce, mimicry, grad});
    // No zero-filled gradients for the outputs nothing differentiates (one is the size of the
    // logits).
    ctx->set_materialize_grads(false);
    return {loss, ce, mimicry, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(16);
    const Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the fused ops of fastdml have no double backward (create_graph=True); use "
                "backend='torch' for higher-order gradients");
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    Tensor grad = ctx->saved_data["grad"].toTensor();
    ctx->saved_data["grad"] = Tensor();
    const bool own = grad.defined() && grad.sizes() == logits.sizes() &&
                     static_cast<int64_t>(grad._version()) ==
                         ctx->saved_data["grad_version"].toInt();
    if (own) {
      scale_grad_(grad, grad_loss);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      grad = std::get<3>(fused_mutual_loss(
          logits, saved[1], optional_tensor(saved[2]), grad_loss,
          ctx->saved_data["mode"].toStringRef(), ctx->saved_data["temperature"].toDouble(),
          ctx->saved_data["alpha"].toDouble(), ctx->saved_data["label_smoothing"].toDouble(),
          ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["reduction"].toStringRef(),
          true, ctx->saved_data["divergence"].toStringRef(), ctx->saved_data["beta"].toDouble(),
          ctx->saved_data["ce_weight"].toDouble(), ctx->saved_data["mimic_unlabeled"].toBool(),
          optional_tensor(saved[3])));
    }
    grads[0] = grad;
    return grads;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_mutual_loss_autograd(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weights,
    const std::optional<Tensor>& grad_scale, c10::string_view mode, double temperature,
    double alpha, double label_smoothing, int64_t ignore_index, c10::string_view reduction,
    bool compute_grad, c10::string_view divergence, double beta, double ce_weight,
    bool mimic_unlabeled, const std::optional<Tensor>& normalizer) {
  auto out = FusedMutualLoss::apply(logits, target, weights, grad_scale, mode, temperature,
                                    alpha, label_smoothing, ignore_index, reduction, compute_grad,
                                    divergence, beta, ce_weight, mimic_unlabeled, normalizer);
  return {out[0], out[1], out[2], out[3]};
}

// scale_grad_ rescales a gradient buffer in place: not differentiable itself, and a version
// bump, so that autograd notices if the buffer was saved for some backward.
void scale_grad_autograd(Tensor& grad, const Tensor& grad_loss) {
  TORCH_CHECK(!grad.requires_grad() && !grad_loss.requires_grad(),
              "fastdml::scale_grad_ rescales the gradient buffer of fused_mutual_loss in place and "
              "is not differentiable; got a tensor that requires grad");
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    scale_grad_(grad, grad_loss);
  }
  grad.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdml, Autograd, m) {
  m.impl("fused_mutual_loss", &fused_mutual_loss_autograd);
  m.impl("scale_grad_", &scale_grad_autograd);
}

}  // namespace fastdml
