// The CPU implementations of the ops of namespace scsa_cpp, plus the Python module scsa_ops._C itself.
// The ops' schemas are defined in Python (scsa_ops/schema.py, when scsa_ops.ops.cpp loads this
// module), their fake implementations in scsa_ops/ops/library.py: C++ only implements them.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>

#include "scsa.h"

#define SCSA_STR_(x) #x
#define SCSA_STR(x) SCSA_STR_(x)

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SCSA CPU kernels; the ops are torch.ops.scsa_cpp.*";
  m.attr("capability") = SCSA_STR(CPU_CAPABILITY);  // the at::vec instruction set this binary was built for
}
