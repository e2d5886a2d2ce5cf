// Op schemas of the fastdml namespace, defined once for all backends; the kernels register
// themselves per device with TORCH_LIBRARY_IMPL (mutual_loss_cpu.cpp, mutual_loss_cuda.cpp), and
// one autograd serves both (mutual_loss_autograd.cpp).
//
// fused_mutual_loss: the loss reduced as asked ("mean" and "sum": a 0-dim loss and [K]
// components; "none": [K, R] each) and, when compute_grad, the gradient of sum(grad_scale * loss)
// (grad_scale absent: 1; 0-dim, or [K, R] at any strides for "none"). Its backward is
// scale_grad_ by the upstream gradient, a no-op where that is 1 (so the grad output is the op's
// own: the backward may rescale it in place). weights are read in mode "weights" only. On the CPU
// a target out of range raises; on CUDA it gives NaN in its row (no host sync), and the reduction
// happens on the device.
// The trailing arguments, with defaults so that callers of the paper's loss need not pass them,
// are the loss family of docs/loss.md: the divergence ("kl", "reverse_kl" or "jsd" with its
// beta), the cross-entropy's weight, mimic_unlabeled (rows whose target is ignore_index keep their
// mimicry) and, for reduction "mean", a 0-dim normalizer on the logits' device that divides both
// terms' sums instead of the rows counted. The CPU op and the Triton op (which takes these
// arguments too) compute them; the CUDA op refuses any that is not its default.
#include <Python.h>
#include <torch/library.h>

// `import fastdml._C` loads this library, which runs the registrations below; the module itself
// has no methods.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdml, m) {
  m.def(
      "fused_mutual_loss(Tensor logits, Tensor target, Tensor? weights, Tensor? grad_scale, "
      "str mode, float temperature, float alpha, float label_smoothing, int ignore_index, "
      "str reduction, bool compute_grad, str divergence='kl', float beta=0.5, "
      "float ce_weight=1.0, bool mimic_unlabeled=False, Tensor? normalizer=None) "
      "-> (Tensor loss, Tensor ce, Tensor mimicry, Tensor grad)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_loss) -> ()");
}
