// Op schemas of the fastdml namespace, defined once for all backends; the kernels register
// themselves per device with TORCH_LIBRARY_IMPL (mutual_loss_cpu.cpp, later CUDA).
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
      "mutual_loss_forward(Tensor logits, Tensor target, Tensor weights, str mode, "
      "float temperature, float label_smoothing, int ignore_index) "
      "-> (Tensor ce, Tensor mimicry, Tensor stats)");
  m.def(
      "mutual_loss_backward(Tensor grad_ce, Tensor grad_mimicry, Tensor logits, Tensor target, "
      "Tensor weights, Tensor stats, str mode, float temperature, float label_smoothing, "
      "int ignore_index) -> Tensor");
}
