// GroupNorm statistics summed in fp64: the backward's variances, and the forward's where an fp32
// sum of squares overflowed (DESIGN.md section 4).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace scsa {

// sum_{i < n} term(i) in fp64, as 8 interleaved partial sums: one chain of dependent adds waits an
// add's latency per term, where 8 chains keep the adder busy (and vectorise).
template <typename F>
double fp64_sum(int64_t n, const F& term) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += term(i + k);
  for (int k = 0; i < n; ++i, ++k) s[k] += term(i);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// The sum of (x - mu)^2 over `rows` rows of `len` values, `ld` apart, squared and summed in fp64:
// the backward's GroupNorm variances, and the forward's where fp32 overflowed.
template <typename A>
double squared_deviations(const A* x, int64_t rows, int64_t len, int64_t ld, A mu) {
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r)
    sum += fp64_sum(len, [&](int64_t i) {
      const double d = x[r * ld + i] - mu;
      return d * d;
    });
  return sum;
}

// The backward's GroupNorm statistics (mean, rstd) of `n` contiguous values, both passes summed in
// fp64.
template <typename A>
std::pair<A, A> fp64_mean_rstd(const A* x, int64_t n, double eps) {
  const double sum = fp64_sum(n, [&](int64_t i) { return double(x[i]); });
  const A mu = A(sum / n);
  return {mu, A(1 / std::sqrt(squared_deviations(x, 1, n, n, mu) / n + eps))};
}

// A GroupNorm variance whose fp32 sum of squares overflowed: finite values whose deviations pass
// sqrt(FLT_MAX) / sqrt(count) (~1e19) have a finite variance, which fp32 squares turn into inf and
// a gate of rstd = 0, a wrong number with no NaN to show it. The sum redone in fp64 (as the
// backward always sums it, squared_deviations) where it is finite; otherwise (a NaN or Inf among
// x) `fp32_sum`, so non-finite inputs propagate as before.
template <typename A>
double overflow_safe_sum_sq(double fp32_sum, const A* x, int64_t rows, int64_t len, int64_t ld, A mu) {
  if (std::isfinite(fp32_sum) || !std::is_same_v<A, float>) return fp32_sum;
  const double sum = squared_deviations(x, rows, len, ld, mu);
  return std::isfinite(sum) ? sum : fp32_sum;
}

}  // namespace scsa
