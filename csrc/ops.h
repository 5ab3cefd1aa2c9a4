// The ops of namespace scsa_cpp as C++ functions (their schemas: scsa_ops/schema.py). A header
// of its own, light on includes: ops.cpp registers them without the kernels' headers.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace scsa {

using at::Tensor;

std::vector<Tensor> forward(const Tensor& x, at::TensorList conv_weights, at::TensorList conv_biases,
                            const Tensor& norm_h_weight, const Tensor& norm_h_bias, const Tensor& norm_w_weight,
                            const Tensor& norm_w_bias, const Tensor& norm_c_weight, const Tensor& norm_c_bias,
                            const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                            const std::optional<Tensor>& q_bias, const std::optional<Tensor>& k_bias,
                            const std::optional<Tensor>& v_bias, int64_t head_num, int64_t kh, int64_t kw, bool softmax,
                            double eps);
Tensor input_grad(const Tensor& g, const Tensor& x, const Tensor& ah, const Tensor& aw, const Tensor& o,
                  const Tensor& dy, const Tensor& dph, const Tensor& dpw, int64_t kh, int64_t kw, bool softmax);
std::tuple<Tensor, Tensor, Tensor, Tensor> gate_grads(const Tensor& g, const Tensor& x, const Tensor& ah,
                                                      const Tensor& aw, int64_t kh, int64_t kw);
std::vector<Tensor> backward(const Tensor& g, const Tensor& x, at::TensorList conv_weights, at::TensorList conv_biases,
                             const Tensor& norm_h_weight, const Tensor& norm_h_bias, const Tensor& norm_w_weight,
                             const Tensor& norm_w_bias, const Tensor& norm_c_weight, const Tensor& norm_c_bias,
                             const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                             const std::optional<Tensor>& q_bias, const std::optional<Tensor>& k_bias,
                             const std::optional<Tensor>& v_bias, const Tensor& ph, const Tensor& pw, const Tensor& ah,
                             const Tensor& aw, const Tensor& y, const Tensor& o, int64_t head_num, int64_t kh,
                             int64_t kw, bool softmax, double eps, bool input_grad);

}  // namespace scsa
