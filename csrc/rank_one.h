// Softmax-weighted sums of one head when its scores have rank one (N == 1: 7x7 maps under a 7x7
// window, global pooling), as power series: the forward's logits and the backward's sums alike
// (DESIGN.md section 2).
#pragma once

#include "vec.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace scsa {

// N == 1 (7x7 maps under a 7x7 window, global pooling): the scores x_i k_j have rank one. With the
// keys centred, k_j = mid + d_j and |d_j| <= rad (e^(x_i mid) cancels in the ratio),
//   o_i = sum_j e^(x_i d_j) v_j / sum_j e^(x_i d_j),
// two power series in x_i whose coefficients, sum_j d_j^p v_j / p! and sum_j d_j^p / p!, every row
// of the head shares: D * kTerms multiply-adds per head instead of D^2 exponentials. Evaluated in
// fp64 for rows with R = |x_i| rad <= kMaxRadius, the truncation error relative to the
// denominator (>= D e^-R) is below R^kTerms / kTerms! e^(2R) < 2e-10, far inside fp32; rows past
// the radius take the exponential loop. fp64 inputs always take the loop.
constexpr int kTerms = 24;
constexpr double kMaxRadius = 3.0;

struct Moments {
  double num[kTerms], den[kTerms], mid, rad;
};

template <typename A>
void key_moments(const A* k, const A* v, int64_t D, A kmax, A kmin, Moments& m) {
  using VD = Vectorized<double>;
  m.mid = (double(kmax) + double(kmin)) / 2, m.rad = (double(kmax) - double(kmin)) / 2;
  if (!(m.rad < 1e12)) {  // d^p would overflow (or keys are NaN): every row takes the loop
    m.rad = std::numeric_limits<double>::infinity();
    return;
  }
  std::vector<double> d(D), vd(D), power(D, 1.0);  // power: d_j^p / p!
  for (int64_t j = 0; j < D; ++j) d[j] = double(k[j]) - m.mid, vd[j] = v[j];
  for (int p = 0; p < kTerms; ++p) {
    VD num(0), den(0);
    const VD next(1.0 / (p + 1));
    for_lanes<double>(D, [&](int64_t j, int64_t n) {
      const VD w = load(power.data() + j, n);  // lanes past n load as 0
      den += w;
      num = at::vec::fmadd(w, load(vd.data() + j, n), num);
      store(power.data() + j, w * load(d.data() + j, n) * next, n);
    });
    m.num[p] = reduce_sum(num), m.den[p] = reduce_sum(den);
  }
}

}  // namespace scsa
