// The CPU implementations of the ops of namespace scsa_cpp, plus the Python module itself
// (scsa_ops._C_<isa>: one per instruction set, see scsa_ops/_build.py). The ops' schemas are
// defined in Python (scsa_ops/schema.py, when scsa_ops.ops.cpp loads this module), their fake
// implementations in scsa_ops/ops/library.py: C++ only implements them. Python's C API, not
// torch/extension.h: the module has nothing to bind but one attribute, and that header tripled
// this file's compile time.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "ops.h"

#define SCSA_STR_(x) #x
#define SCSA_STR(x) SCSA_STR_(x)
#define SCSA_CAT_(a, b) a##b
#define SCSA_CAT(a, b) SCSA_CAT_(a, b)

TORCH_LIBRARY_IMPL(scsa_cpp, CPU, m) {
  m.impl("forward", &scsa::forward);
  m.impl("gate_grads", &scsa::gate_grads);
  m.impl("input_grad", &scsa::input_grad);
  m.impl("backward", &scsa::backward);
}

// The ops are the inside of scsa_ops.function.SCSAFunction, which owns their gradients; called
// directly on tensors that require grad they say so instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(scsa_cpp, Autograd, m) {
  m.impl("forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("gate_grads", torch::autograd::autogradNotImplementedFallback());
  m.impl("input_grad", torch::autograd::autogradNotImplementedFallback());
  m.impl("backward", torch::autograd::autogradNotImplementedFallback());
}

PyMODINIT_FUNC SCSA_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, SCSA_STR(TORCH_EXTENSION_NAME),
                               "Fused SCSA CPU kernels; the ops are torch.ops.scsa_cpp.*", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  // The at::vec instruction set this binary was built for.
  if (m != nullptr && PyModule_AddStringConstant(m, "capability", SCSA_STR(CPU_CAPABILITY)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
