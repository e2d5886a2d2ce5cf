// Op schemas of the fastdml namespace, defined once for all backends; the kernels register
// themselves per device with TORCH_LIBRARY_IMPL (mutual_loss_cpu.cpp, mutual_loss_cuda.cpp).
//
// fused_mutual_loss / scale_grad_ (CPU): the loss reduced as asked ("mean" and "sum": a 0-dim loss
// and [K] components; "none": [K, R] each) and, when compute_grad, the gradient of
// sum(grad_scale * loss) (grad_scale absent: 1), whose backward (mutual_loss_autograd.cpp) is
// scale_grad_ by the upstream gradient, a no-op where that is 1 (so the grad output is the op's
// own: the backward may rescale it in place). weights are read in mode "weights" only.
// mutual_loss_with_grad / scale_grad_rows_ (CUDA): the forward also writes the gradient of
// sum s * loss, s[k, r] being row_scale (0-dim, or [K, R] at any strides) where it is nonzero and
// 1 where it is 0 (a zero scale folds nothing in); scale_grad_rows_ multiplies row (k, r) of that
// gradient by grad_loss[k, r] / s[k, r], leaving alone the rows where they are equal, which for
// reduction "mean" and "sum" is all of them: no second pass over memory.
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
      "str reduction, bool compute_grad) -> (Tensor loss, Tensor ce, Tensor mimicry, Tensor grad)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_loss) -> ()");
  m.def(
      "mutual_loss_with_grad(Tensor logits, Tensor target, Tensor weights, Tensor row_scale, "
      "str mode, float temperature, float alpha, float label_smoothing, int ignore_index, "
      "bool compute_grad) -> (Tensor loss, Tensor ce, Tensor mimicry, Tensor grad)");
  m.def("scale_grad_rows_(Tensor(a!) grad, Tensor grad_loss, Tensor row_scale) -> ()");
}
