// The CPU forward: the five passes of DESIGN.md section 2 (pool, spatial_gate, gated_pool,
// channel_attention, apply_gates), one op call. Every step of SCSA is per sample, so with enough
// samples per thread the passes run sample-major: a task takes one sample through all five while
// it sits in that core's L2 (X is read from memory once instead of three times). Small batches run
// pass-major with each pass parallel inside. The returned intermediates are what the backward saves.
#include "scsa.h"

namespace scsa {

Weights load_weights(int64_t C, at::ScalarType acc, at::TensorList conv_weights, at::TensorList conv_biases,
                     const Tensor& norm_h_weight, const Tensor& norm_h_bias, const Tensor& norm_w_weight,
                     const Tensor& norm_w_bias, const Tensor& norm_c_weight, const Tensor& norm_c_bias,
                     const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                     const std::optional<Tensor>& q_bias, const std::optional<Tensor>& k_bias,
                     const std::optional<Tensor>& v_bias) {
  const int64_t G = C / 4;
  TORCH_CHECK(conv_weights.size() == 4 && conv_biases.size() == 4,
              "scsa_cpp: the ops take 4 conv weights and 4 conv biases, got ", conv_weights.size(), " and ",
              conv_biases.size());
  TORCH_CHECK(q_bias.has_value() == k_bias.has_value() && k_bias.has_value() == v_bias.has_value(),
              "scsa_cpp: q, k and v biases must be all given or all absent");
  Weights p;
  for (int i = 0; i < 4; ++i) {
    const auto& w = conv_weights[i];
    TORCH_CHECK(w.dim() == 3 && w.size(0) == G && w.size(1) == 1 && w.size(2) % 2 == 1, "scsa_cpp: conv weight ", i,
                " must be (", G, ", 1, odd k), got ", w.sizes());
    p.kernel_sizes.push_back(w.size(2));
    p.conv_w.push_back(param(w, "conv weight", G * w.size(2), acc));
    p.conv_b.push_back(param(conv_biases[i], "conv bias", G, acc));
  }
  p.norm_h_weight = param(norm_h_weight, "norm_h.weight", C, acc);
  p.norm_h_bias = param(norm_h_bias, "norm_h.bias", C, acc);
  p.norm_w_weight = param(norm_w_weight, "norm_w.weight", C, acc);
  p.norm_w_bias = param(norm_w_bias, "norm_w.bias", C, acc);
  p.norm_c_weight = param(norm_c_weight, "norm.weight", C, acc);
  p.norm_c_bias = param(norm_c_bias, "norm.bias", C, acc);
  p.q_weight = param(q_weight, "q.weight", C, acc);
  p.k_weight = param(k_weight, "k.weight", C, acc);
  p.v_weight = param(v_weight, "v.weight", C, acc);
  if (q_bias) {
    p.q_bias = param(*q_bias, "q.bias", C, acc);
    p.k_bias = param(*k_bias, "k.bias", C, acc);
    p.v_bias = param(*v_bias, "v.bias", C, acc);
  }
  return p;
}

std::vector<Tensor> forward(const Tensor& x_in, at::TensorList conv_weights, at::TensorList conv_biases,
                            const Tensor& norm_h_weight, const Tensor& norm_h_bias, const Tensor& norm_w_weight,
                            const Tensor& norm_w_bias, const Tensor& norm_c_weight, const Tensor& norm_c_bias,
                            const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                            const std::optional<Tensor>& q_bias, const std::optional<Tensor>& k_bias,
                            const std::optional<Tensor>& v_bias, int64_t head_num, int64_t kh, int64_t kw, bool softmax,
                            double eps) {
  check_x(x_in, "x");
  check_window(x_in, kh, kw);
  Forward f;
  std::tie(f.x, f.channels_last) = dense(x_in);
  f.B = f.x.size(0), f.C = f.x.size(1), f.H = f.x.size(2), f.W = f.x.size(3);
  f.kh = kh, f.kw = kw, f.head_num = head_num, f.softmax = softmax, f.eps = eps;
  const int64_t B = f.B, C = f.C;
  TORCH_CHECK(head_num >= 1 && C % head_num == 0, "scsa_cpp: head_num ", head_num, " must divide C = ", C);
  const auto acc = acc_dtype(f.x.scalar_type());
  static_cast<Weights&>(f) =
      load_weights(C, acc, conv_weights, conv_biases, norm_h_weight, norm_h_bias, norm_w_weight, norm_w_bias,
                   norm_c_weight, norm_c_bias, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias);
  if (!parameters_finite(f)) return forward_eager(f);
  const auto opts = f.x.options().dtype(acc);
  f.ph = alloc({B, C, f.H}, opts);
  f.pw = alloc({1, B, C, f.W}, opts);
  f.ah = alloc({B, C, f.H}, opts);
  f.aw = alloc({B, C, f.W}, opts);
  f.y = alloc({B, C, f.H / kh, f.W / kw}, opts);
  f.o = alloc({B, C}, opts);
  f.out = alloc(f.x.sizes(), f.x.options().memory_format(format_of(f.channels_last)));
  // F1-F3 over the channel groups of samples [b0, b0 + nb) in `parts` runs of 4 / parts groups,
  // then F4-F5.
  auto run = [&](int64_t b0, int64_t nb, int64_t parts) {
    for (int64_t g = 0; g < 4; g += 4 / parts) {
      const Part part{b0, nb, g, 4 / parts};
      pool(f, part);
      spatial_gate(f, part);
      gated_pool(f, part);
    }
    channel_attention(f, b0, nb);
    apply_gates(f, b0, nb);
  };
  if (B >= 2 * at::get_num_threads()) {
    // Nested at::parallel_for calls inside the passes run inline on this task's thread. NCHW
    // samples take F1-F3 a channel group at a time, so that gated_pool finds X in L2 where pool
    // left it: a (64, 56, 56) fp32 sample (784 KiB) outgrows a 512 KiB L2, its groups do not. Not
    // channels_last, where a group is a quarter of every pixel: four strided sweeps of the sample
    // would read every cache line four times.
    const int64_t parts = f.channels_last ? 1 : 4;
    for_each_sample(B, [&](int64_t b) { run(b, 1, parts); });
  } else {
    run(0, B, 1);
  }
  return {f.out, f.ph, f.pw, f.ah, f.aw, f.y, f.o};
}

}  // namespace scsa
