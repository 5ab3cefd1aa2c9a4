// torch.library registration of the CPU path (namespace scsa_cpp; the fake implementations for
// torch.compile live in scsa_ops/ops/library.py), plus the Python module scsa_ops._C itself.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>

#include "scsa.h"

#define SCSA_STR_(x) #x
#define SCSA_STR(x) SCSA_STR_(x)

TORCH_LIBRARY(scsa_cpp, m) {
  m.def(
      "forward(Tensor x, Tensor[] conv_weights, Tensor[] conv_biases, Tensor norm_h_weight, Tensor norm_h_bias, "
      "Tensor norm_w_weight, Tensor norm_w_bias, Tensor norm_weight, Tensor norm_bias, Tensor q_weight, "
      "Tensor k_weight, Tensor v_weight, Tensor? q_bias, Tensor? k_bias, Tensor? v_bias, int head_num, int kh, "
      "int kw, bool softmax, float eps) -> Tensor[]");
  m.def("gate_grads(Tensor g, Tensor x, Tensor ah, Tensor aw, int kh, int kw) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "input_grad(Tensor g, Tensor x, Tensor ah, Tensor aw, Tensor o, Tensor dy, Tensor dph, Tensor dpw, "
      "int kh, int kw, bool softmax) -> Tensor");
}

TORCH_LIBRARY_IMPL(scsa_cpp, CPU, m) {
  m.impl("forward", &scsa::forward);
  m.impl("gate_grads", &scsa::gate_grads);
  m.impl("input_grad", &scsa::input_grad);
}

// The ops are the inside of scsa_ops.function.SCSAFunction, which owns their gradients; called
// directly on tensors that require grad they say so instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(scsa_cpp, Autograd, m) {
  m.impl("forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("gate_grads", torch::autograd::autogradNotImplementedFallback());
  m.impl("input_grad", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SCSA CPU kernels; the ops are torch.ops.scsa_cpp.*";
  m.attr("capability") = SCSA_STR(CPU_CAPABILITY);  // the at::vec instruction set this binary was built for
}
