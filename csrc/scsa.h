// The pass interface of the fused SCSA CPU path (DESIGN.md sections 2-3): the parameters of a call,
// the state of one forward and one backward call, and the passes that fill them. The building
// blocks live beside it: vec.h (at::vec loads, stores, reductions, exp2), stats.h (fp64 GroupNorm
// statistics), parallel.h (schedule and prefetch), checks.h (checks, layout, allocation).
#pragma once

#include "checks.h"
#include "ops.h"
#include "parallel.h"
#include "stats.h"
#include "vec.h"

#include <tuple>
#include <vector>

namespace scsa {

// Channel gate a_c (B, C) from the logits o (B, C): sigmoid, or softmax over the channels.
template <typename A>
inline void channel_gate(const A* o, A* ac, int64_t B, int64_t C, bool softmax) {
  for (int64_t b = 0; b < B; ++b) {
    const A* ob = o + b * C;
    A* a = ac + b * C;
    if (softmax) {
      A m = *std::max_element(ob, ob + C), s = 0;
      for (int64_t c = 0; c < C; ++c) s += a[c] = std::exp(ob[c] - m);
      for (int64_t c = 0; c < C; ++c) a[c] /= s;
    } else {
      using V = Vectorized<A>;
      const V to_log2(A(-kLog2e));
      for_lanes<A>(
          C, [&](int64_t c, int64_t n) { (V(1) / (V(1) + exp2(V::loadu(ob + c, n) * to_log2))).store(a + c, n); });
    }
  }
}

// The parameters of one call, checked and converted once to the accumulator dtype (contiguous).
struct Weights {
  std::vector<Tensor> conv_w, conv_b;  // (G * k_i) and (G) per channel group
  std::vector<int64_t> kernel_sizes;
  Tensor norm_h_weight, norm_h_bias, norm_w_weight, norm_w_bias, norm_c_weight, norm_c_bias;
  Tensor q_weight, k_weight, v_weight, q_bias, k_bias, v_bias;  // biases undefined without qkv_bias
};

Weights load_weights(int64_t C, at::ScalarType acc, at::TensorList conv_weights, at::TensorList conv_biases,
                     const Tensor& norm_h_weight, const Tensor& norm_h_bias, const Tensor& norm_w_weight,
                     const Tensor& norm_w_bias, const Tensor& norm_c_weight, const Tensor& norm_c_bias,
                     const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                     const std::optional<Tensor>& q_bias, const std::optional<Tensor>& k_bias,
                     const std::optional<Tensor>& v_bias);

// One forward call: the input, its parameters, and the outputs the passes fill. Each pass runs on
// samples [b0, b0 + nb).
struct Forward : Weights {
  Tensor x;
  bool channels_last;
  int64_t B, C, H, W, kh, kw, head_num;
  bool softmax;
  double eps;
  Tensor out, ph, pw, ah, aw, y, o;  // pw: (1, B, C, W), the Triton provider's banded layout with one band
};

// One backward call (backward.cpp): the forward's intermediates and the sums of the first
// full-size pass (gate_grads) in, per-sample results out. The small graphs of DESIGN.md 3.2 run
// per sample b, each writing only row b of dy / dph / dpw / partials, so samples run in parallel
// and the parameter gradients, partials summed over b in order, do not depend on the threads.
struct Backward : Weights {
  at::ScalarType dtype;  // x's
  int64_t B, C, H, W, kh, kw, head_num;
  bool softmax;
  double eps;
  Tensor ph, pw, ah, aw, y, o;  // the forward's: (B, C, H), (1, B, C, W), (B, C, H), (B, C, W), (B, C, N), (B, C)
  Tensor r, s, u, v;            // gate_grads' sums
  Tensor dy, dph, dpw;          // input_grad's: dL/dY / (KH KW), dL/dp_h / W, dL/dp_w / H
  Tensor partials;              // (B, P): each sample's parameter gradients, in the op's output order
  // Where each gradient starts in a row of partials: conv weights (4), conv biases (4), norm_h
  // weight and bias, norm_w, norm_c, q/k/v weights, q/k/v biases (with qkv_bias).
  std::vector<int64_t> at;
};

// The backward's full-size passes on samples [b0, b0 + nb) of tensors already checked (g and x
// dense in one layout, the small ones contiguous in the accumulator dtype): gate_grads' sums into
// r, s, u, v (gate_grad_sums allocates them), and dX.
std::tuple<Tensor, Tensor, Tensor, Tensor> gate_grad_sums(int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                                                          int64_t kw, const at::TensorOptions& opts);
void gate_grads_samples(const Tensor& g, const Tensor& x, bool channels_last, const Tensor& ah, const Tensor& aw,
                        const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, int64_t kh, int64_t kw,
                        int64_t b0, int64_t nb);
void input_grad_samples(const Tensor& g, Tensor& dx, bool channels_last, const Tensor& ah, const Tensor& aw,
                        const Tensor& o, const Tensor& dy, const Tensor& dph, const Tensor& dpw, int64_t kh, int64_t kw,
                        bool softmax, int64_t b0, int64_t nb);

// Indices into Backward::at.
constexpr int kConvW = 0, kConvB = 4, kNormH = 8, kNormW = 10, kNormC = 12, kQkvW = 14, kQkvB = 17;

// Sample b's channel attention backward: dA = dL/da_c (C) in, a_c (C) out; writes dy[b] and the
// norm_c / q / k / v partials.
template <typename A>
void channel_attention_backward(Backward& bw, int64_t b, const A* dA, A* ac);
// Sample b's spatial gate backward of branch h (H) or w (W): da = dL/da (C, L) in; writes dph[b]
// or dpw[b] and the norm_h or norm_w partials, and adds into the conv partials.
template <typename A>
void spatial_gate_backward(Backward& bw, int64_t b, bool branch_w, const A* da);

// What F1-F3 run on: samples [b0, b0 + nb) and, of each, the channel groups [g0, g0 + ng) (the four
// GroupNorm groups: nothing in F1-F3 crosses them). A part of one group is one sample's run of
// NCHW planes; channels_last and several samples take all four.
struct Part {
  int64_t b0, nb, g0 = 0, ng = 4;
  // The part's first (sample, channel) plane: the offset, in planes, of its X, sums and gates.
  int64_t first_plane(int64_t C, bool channels_last) const {
    TORCH_INTERNAL_ASSERT(ng == 4 || (nb == 1 && !channels_last), "scsa_cpp: a part of some groups is one NCHW sample");
    return b0 * C + g0 * (C / 4);
  }
  int64_t planes(int64_t C) const { return nb * ng * (C / 4); }
};
void pool(Forward& f, const Part& part);
void spatial_gate(Forward& f, const Part& part);
void gated_pool(Forward& f, const Part& part);
void channel_attention(Forward& f, int64_t b0, int64_t nb);
void apply_gates(Forward& f, int64_t b0, int64_t nb);
// nonfinite.cpp: whether every parameter is finite, and the forward for when one is not.
bool parameters_finite(const Weights& f);
std::vector<Tensor> forward_eager(const Forward& f);

}  // namespace scsa
