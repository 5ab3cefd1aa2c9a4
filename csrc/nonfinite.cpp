// The forward for parameters that hold NaN or Inf. Where a non-finite value goes depends on how
// each op is written (torch's GroupNorm, for one, folds the mean into its shift, so an infinite
// weight turns some positions into inf - inf and others into -inf), and the fused passes are
// written differently on purpose (for accuracy). Such parameters are a diverged model, never the
// hot path: there the op runs the eager module's own sequence of ATen ops (scsa_ops/reference.py,
// step for step) in the input's dtype, as the eager module converted to it would (overflow in
// fp16 is part of where an Inf lands), so NaN and Inf land exactly where the eager module's do.
#include <ATen/ATen.h>  // the eager ops: every kernel of ATen, where the passes need only at::vec

#include <cmath>

#include "scsa.h"

namespace scsa {
namespace {

template <typename A>
bool finite(const Tensor& t) {
  // x * 0 is 0 for a finite x and NaN for NaN or +-Inf: one NaN test at the end.
  using V = Vectorized<A>;
  const A* p = t.const_data_ptr<A>();
  V acc(0);
  for_lanes<A>(t.numel(), [&](int64_t i, int64_t n) { acc = at::vec::fmadd(load(p + i, n), V(0), acc); });
  return !std::isnan(reduce_sum(acc));
}

// A parameter in the input's dtype (it was converted to the accumulator dtype exactly).
Tensor as_x(const Forward& f, const Tensor& t) { return t.defined() ? t.to(f.x.scalar_type()) : t; }

Tensor gate(const Forward& f, const Tensor& mean, const Tensor& gn_w, const Tensor& gn_b) {
  const int64_t G = f.C / 4;
  const auto groups = mean.chunk(4, 1);
  std::vector<Tensor> z;
  for (int i = 0; i < 4; ++i) {
    const int64_t k = f.kernel_sizes[i];
    z.push_back(at::conv1d(groups[i], as_x(f, f.conv_w[i]).view({G, 1, k}), as_x(f, f.conv_b[i]), 1, k / 2, 1, G));
  }
  const Tensor zn = at::group_norm(at::cat(z, 1), 4, as_x(f, gn_w), as_x(f, gn_b), f.eps);
  return f.softmax ? zn.softmax(2) : zn.sigmoid();
}

Tensor qkv(const Forward& f, const Tensor& yn, const Tensor& w, const Tensor& bias) {
  const Tensor t = yn * as_x(f, w).view({1, f.C, 1});
  return bias.defined() ? t + as_x(f, bias).view({1, f.C, 1}) : t;
}

}  // namespace

bool parameters_finite(const Weights& f) {
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(f.norm_c_weight.scalar_type(), "scsa_parameters_finite", [&] {
    for (const auto* list : {&f.conv_w, &f.conv_b})
      for (const auto& t : *list) ok = ok && finite<scalar_t>(t);
    for (const auto* t : {&f.norm_h_weight, &f.norm_h_bias, &f.norm_w_weight, &f.norm_w_bias, &f.norm_c_weight,
                          &f.norm_c_bias, &f.q_weight, &f.k_weight, &f.v_weight, &f.q_bias, &f.k_bias, &f.v_bias})
      ok = ok && (!t->defined() || finite<scalar_t>(*t));
  });
  return ok;
}

std::vector<Tensor> forward_eager(const Forward& f) {
  const int64_t B = f.B, C = f.C, heads = f.head_num, D = C / heads;
  const Tensor& x = f.x;
  const Tensor ah = gate(f, x.mean(3), f.norm_h_weight, f.norm_h_bias);
  const Tensor aw = gate(f, x.mean(2), f.norm_w_weight, f.norm_w_bias);
  const Tensor xs = x * ah.unsqueeze(3) * aw.unsqueeze(2);
  const Tensor y = at::avg_pool2d(xs, {f.kh, f.kw}, {f.kh, f.kw});
  const Tensor yn = at::group_norm(y, 1, as_x(f, f.norm_c_weight), as_x(f, f.norm_c_bias), f.eps).flatten(2);
  const int64_t N = yn.size(2);
  const Tensor q = qkv(f, yn, f.q_weight, f.q_bias).view({B, heads, D, N});
  const Tensor k = qkv(f, yn, f.k_weight, f.k_bias).view({B, heads, D, N});
  const Tensor v = qkv(f, yn, f.v_weight, f.v_bias);
  const Tensor attn = (at::matmul(q, k.transpose(-2, -1)) * std::pow(double(D), -0.5)).softmax(-1);
  const Tensor o = at::matmul(attn, v.mean(-1).view({B, heads, D, 1})).view({B, C});
  const Tensor ac = f.softmax ? o.softmax(1) : o.sigmoid();
  const Tensor out = (xs * ac.view({B, C, 1, 1})).contiguous(format_of(f.channels_last));
  // The small outputs in the accumulator dtype, p_h and p_w as sums, as the fused passes leave them.
  const auto acc = f.norm_c_weight.scalar_type();
  const Tensor xa = x.to(acc);
  return {out, xa.sum(3), xa.sum(2).unsqueeze(0), ah.to(acc), aw.to(acc), y.to(acc), o.to(acc)};
}

}  // namespace scsa
