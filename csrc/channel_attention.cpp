// F4 of DESIGN.md: channel-attention logits o (B, C) from the pooled map Y (B, C, N).
// GroupNorm(1) and the q/k/v depthwise 1x1 convs fold into per-channel affines
// (Q = alpha_q * Y + beta_q), and mean_n(P V) = P @ mean_n(V), so a query row needs only K and
// the vector vbar. Each task owns a block of query rows of one head: it stages K^T of the head
// (N x D, padded to whole vectors), then per row computes the D scores and their exponentials
// with at::vec: the C^2 exponentials per sample are where (8, 512, 7, 7) spends its time, so
// scores are kept in log2 units (log2(e) folded into the queries) and exponentiated by exp2 of
// scsa.h (<= 1 ulp, 9 instructions on AVX512).
#include <cmath>
#include <limits>
#include <type_traits>

#include "scsa.h"

namespace scsa {
namespace {

// Query rows per task: a task stages its head's K^T once, so rows share that cost; 64 still gives
// two threads several tasks per head at the ResNet widths (D >= 64).
constexpr int64_t kRowsPerTask = 64;
constexpr int64_t kBlock = 8;  // key vectors scored together

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
      const VD w = VD::loadu(power.data() + j, n);  // lanes past n load as 0
      den += w;
      num = at::vec::fmadd(w, VD::loadu(vd.data() + j, n), num);
      (w * VD::loadu(d.data() + j, n) * next).store(power.data() + j, n);
    });
    m.num[p] = reduce_sum(num), m.den[p] = reduce_sum(den);
  }
}

template <typename A>
struct Affine {  // per sample: the GroupNorm mean; per (sample, channel): alpha, beta of q, k, and vbar
  std::vector<A> mu, aq, bq, ak, bk, vbar;
};

template <typename A>
void channel_attention_impl(const A* y, A* o, const A* gn_w, const A* gn_b, const A* wq, const A* wk, const A* wv,
                            const A* bq, const A* bk, const A* bv, int64_t B, int64_t C, int64_t N, int64_t heads,
                            A eps) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t D = C / heads, Dp = (D + L - 1) / L * L;
  Affine<A> f{std::vector<A>(B),     std::vector<A>(B * C), std::vector<A>(B * C),
              std::vector<A>(B * C), std::vector<A>(B * C), std::vector<A>(B * C)};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const A* yb = y + b * C * N;
      const int64_t M = C * N;
      V s1(0);
      for_lanes<A>(M, [&](int64_t k, int64_t n) { s1 += V::loadu(yb + k, n); });
      const A mu = f.mu[b] = reduce_sum(s1) / A(M);
      V s2(0);
      for_lanes<A>(M, [&](int64_t k, int64_t n) {
        auto d = V::loadu(yb + k, n) - V(mu);
        s2 += V::set(V(0), d * d, n);  // lanes past n would add mu^2
      });
      const A rstd = A(1) / std::sqrt(reduce_sum(s2) / A(M) + eps);
      for (int64_t c = 0; c < C; ++c) {
        // w * ((y - mu) * rstd * gn_w + gn_b) + bias == alpha * (y - mu) + beta: mu is not folded
        // into beta, whose rounding would then be amplified by |mu| / std(y).
        const A g = gn_w[c] * rstd, i = b * C + c;
        f.aq[i] = wq[c] * g;
        f.bq[i] = wq[c] * gn_b[c] + (bq ? bq[c] : A(0));
        f.ak[i] = wk[c] * g;
        f.bk[i] = wk[c] * gn_b[c] + (bk ? bk[c] : A(0));
        V ysum(0);
        for_lanes<A>(N, [&](int64_t n0, int64_t n) { ysum += V::loadu(yb + c * N + n0, n); });
        f.vbar[i] = wv[c] * g * (reduce_sum(ysum) / A(N) - mu) + wv[c] * gn_b[c] + (bv ? bv[c] : A(0));
      }
    }
  });
  const int64_t chunks = (D + kRowsPerTask - 1) / kRowsPerTask;
  const A q_scale = A(kLog2e) / std::sqrt(A(D));
  // A row is normalised against an upper bound of its max, sum_n max_j(q_n K[n, j]), so scores,
  // exponentials and sums take one pass (the bound is the exact max when N == 1, as for 7x7 maps
  // with a 7x7 window). If the bound overshoots so far that every term underflows, the row is redone
  // against its exact max.
  const A min_den = std::numeric_limits<A>::min() * A(1 << 24);
  const bool rank_one = N == 1 && std::is_same_v<A, float>;
  const double inv_sqrt_d = 1 / std::sqrt(double(D));
  at::parallel_for(0, B * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kt(N * Dp), vbar(Dp), kmax(N), kmin(N), q(N);
    Moments mom{};
    bool done[kRowsPerTask];  // rank one: rows the power series answered
    // Added to the last vector of scores: padding lanes get kPadScore, so exp2() makes them 0.
    alignas(64) A tail[L];
    for (int64_t l = 0; l < L; ++l) tail[l] = (Dp - L + l) < D ? A(0) : A(kPadScore);
    const V tail_v = V::loadu(tail);
    // Scores of NU key vectors at once (NU a constant, so they stay in registers): independent
    // accumulators let the N-long fmadd chains (and, for N == 1, the exponentials) overlap.
    // Each starts from `from` (minus the row's max: the subtraction rides in the fmadd chain).
    auto scores = [&](int64_t j0, auto nu, V* s, A from) {
      constexpr int NU = decltype(nu)::value;
      V odd[NU];  // odd n into a second set of accumulators: twice the chains in flight
      for (int u = 0; u < NU; ++u) s[u] = V(from), odd[u] = V(0);
      int64_t n = 0;
      for (; n + 1 < N; n += 2) {
        const V q0(q[n]), q1(q[n + 1]);
        const A* k = kt.data() + n * Dp + j0;
        for (int u = 0; u < NU; ++u) {
          s[u] = at::vec::fmadd(q0, V::loadu(k + u * L), s[u]);
          odd[u] = at::vec::fmadd(q1, V::loadu(k + Dp + u * L), odd[u]);
        }
      }
      if (n < N) {
        const V qn(q[n]);
        for (int u = 0; u < NU; ++u) s[u] = at::vec::fmadd(qn, V::loadu(kt.data() + n * Dp + j0 + u * L), s[u]);
      }
      for (int u = 0; u < NU; ++u) s[u] = s[u] + odd[u];
      if (j0 + NU * L == Dp) s[NU - 1] = s[NU - 1] + tail_v;
    };
    // f(j0, scores of NU vectors from j0) over every key vector: blocks of kBlock, kBlock / 2, then 1.
    auto for_blocks = [&](A from, auto f) {
      V s[kBlock];
      int64_t j0 = 0;
      for (; j0 + kBlock * L <= Dp; j0 += kBlock * L) {
        scores(j0, std::integral_constant<int, kBlock>{}, s, from);
        f(j0, std::integral_constant<int, kBlock>{}, s);
      }
      for (; j0 + kBlock / 2 * L <= Dp; j0 += kBlock / 2 * L) {
        scores(j0, std::integral_constant<int, kBlock / 2>{}, s, from);
        f(j0, std::integral_constant<int, kBlock / 2>{}, s);
      }
      for (; j0 < Dp; j0 += L) {
        scores(j0, std::integral_constant<int, 1>{}, s, from);
        f(j0, std::integral_constant<int, 1>{}, s);
      }
    };
    auto softmax_dot = [&](A m, A& num, A& den) {
      V vn(0), vd(0);
      for_blocks(-m, [&](int64_t j0, auto nu, const V* s) {
        for (int u = 0; u < decltype(nu)::value; ++u) {
          const V p = exp2(s[u]);
          vd += p;
          vn = at::vec::fmadd(p, V::loadu(vbar.data() + j0 + u * L), vn);
        }
      });
      num = reduce_sum(vn), den = reduce_sum(vd);
    };
    auto row_max = [&]() {
      V mx(static_cast<A>(kPadScore));
      for_blocks(A(0), [&](int64_t, auto nu, const V* s) {
        for (int u = 0; u < decltype(nu)::value; ++u) mx = at::vec::maximum(mx, s[u]);
      });
      return reduce_max(mx);
    };
    int64_t staged = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, b = bh / heads, c0 = bh % heads * D;
      const A* yb = y + b * C * N;
      if (bh != staged) {  // K^T, its row extremes, and vbar of this head
        std::fill(kt.begin(), kt.end(), A(0));
        std::fill(vbar.begin(), vbar.end(), A(0));
        for (int64_t j = 0; j < D; ++j) {
          const int64_t i = b * C + c0 + j;
          for (int64_t n = 0; n < N; ++n) kt[n * Dp + j] = f.ak[i] * (yb[(c0 + j) * N + n] - f.mu[b]) + f.bk[i];
          vbar[j] = f.vbar[i];
        }
        for (int64_t n = 0; n < N; ++n) {
          V mx(static_cast<A>(kPadScore)), mn(A(-kPadScore));
          for_lanes<A>(D, [&](int64_t j, int64_t m) {
            const V k = V::loadu(kt.data() + n * Dp + j);
            mx = at::vec::maximum(mx, V::set(V(A(kPadScore)), k, m));
            mn = at::vec::minimum(mn, V::set(V(A(-kPadScore)), k, m));
          });
          kmax[n] = reduce_max(mx), kmin[n] = -reduce_max(-mn);
        }
        if (rank_one) key_moments(kt.data(), vbar.data(), D, kmax[0], kmin[0], mom);
        staged = bh;
      }
      const int64_t r0 = t % chunks * kRowsPerTask, r1 = std::min(D, r0 + kRowsPerTask);
      if (rank_one) {  // the power series for a vector of rows at a time
        using VD = Vectorized<double>;
        alignas(64) double x[kRowsPerTask], ratio[kRowsPerTask];
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = b * C + c0 + r;
          x[r - r0] = double(f.aq[i] * (yb[c0 + r] - f.mu[b]) + f.bq[i]) * inv_sqrt_d;
        }
        for_lanes<double>(r1 - r0, [&](int64_t r, int64_t n) {
          const VD xv = VD::loadu(x + r, n);
          VD num(mom.num[kTerms - 1]), den(mom.den[kTerms - 1]);
          for (int p = kTerms - 2; p >= 0; --p)
            num = at::vec::fmadd(num, xv, VD(mom.num[p])), den = at::vec::fmadd(den, xv, VD(mom.den[p]));
          (num / den).store(ratio + r, n);
        });
        for (int64_t r = r0; r < r1; ++r)
          if ((done[r - r0] = std::abs(x[r - r0]) * mom.rad <= kMaxRadius)) o[b * C + c0 + r] = A(ratio[r - r0]);
      }
      for (int64_t r = r0; r < r1; ++r) {
        if (rank_one && done[r - r0]) continue;
        const int64_t i = b * C + c0 + r;
        A bound = 0, num, den;
        for (int64_t n = 0; n < N; ++n) {
          q[n] = (f.aq[i] * (yb[(c0 + r) * N + n] - f.mu[b]) + f.bq[i]) * q_scale;
          bound += q[n] >= 0 ? q[n] * kmax[n] : q[n] * kmin[n];
        }
        softmax_dot(bound, num, den);
        if (!(den >= min_den)) softmax_dot(row_max(), num, den);
        o[i] = num / den;
      }
    }
  });
}

}  // namespace

void channel_attention(Forward& f, int64_t b0, int64_t nb) {
  const int64_t C = f.C, N = f.y.size(2) * f.y.size(3);
  AT_DISPATCH_FLOATING_TYPES(f.y.scalar_type(), "scsa_channel_attention", [&] {
    using A = scalar_t;
    auto ptr = [](const Tensor& t) { return t.defined() ? t.const_data_ptr<A>() : nullptr; };
    channel_attention_impl<A>(ptr(f.y) + b0 * C * N, f.o.data_ptr<A>() + b0 * C, ptr(f.norm_weight), ptr(f.norm_bias),
                              ptr(f.q_weight), ptr(f.k_weight), ptr(f.v_weight), ptr(f.q_bias), ptr(f.k_bias),
                              ptr(f.v_bias), nb, C, N, f.head_num, A(f.eps));
  });
}

}  // namespace scsa
