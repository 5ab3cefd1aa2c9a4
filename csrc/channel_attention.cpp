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

#include "rank_one.h"
#include "scsa.h"

namespace scsa {
namespace {

// Query rows per task: a task stages its head's K^T once, so rows share that cost; 64 still gives
// two threads several tasks per head at the ResNet widths (D >= 64).
constexpr int64_t kRowsPerTask = 64;
constexpr int64_t kBlock = 8;  // key vectors scored together

template <typename A>
struct Affine {  // per sample: the GroupNorm mean; per (sample, channel): alpha, beta of q, k, and vbar
  std::vector<A> mu, aq, bq, ak, bk, vbar;
};

// The pass's inputs: Y (B, C, N), the GroupNorm(1) affine and the q/k/v weights and biases (C,);
// biases may be null (qkv_bias=False).
template <typename A>
struct Inputs {
  const A *y, *gn_w, *gn_b, *wq, *wk, *wv, *bq, *bk, *bv;
  int64_t B, C, N, heads;
  A eps;
};

// sum over k < len of term(k, lanes): vector partial sums over chunks of kChunk elements, the
// chunks added in fp64. A sample's statistics sum C N terms (tens of thousands with a small
// window): one fp32 vector accumulator over all of them would lose ~len / 16 ulps.
constexpr int64_t kChunk = 1024;

template <typename A, typename F>
double chunked_sum(int64_t len, const F& term) {
  using V = Vectorized<A>;
  double total = 0;
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    V acc(0);
    const int64_t end = std::min(len, c0 + kChunk);
    for (int64_t k = c0; k < end; k += V::size()) acc += term(k, std::min<int64_t>(V::size(), end - k));
    total += reduce_sum(acc);
  }
  return total;
}

// GroupNorm(1) statistics per sample, folded with the q/k/v convs into per-channel affines:
// w * ((y - mu) * rstd * gn_w + gn_b) + bias == alpha * (y - mu) + beta. mu is not folded into
// beta, whose rounding would then be amplified by |mu| / std(y).
template <typename A>
Affine<A> fold_affines(const Inputs<A>& in) {
  using V = Vectorized<A>;
  const int64_t B = in.B, C = in.C, N = in.N, M = C * N;
  Affine<A> f{std::vector<A>(B),     std::vector<A>(B * C), std::vector<A>(B * C),
              std::vector<A>(B * C), std::vector<A>(B * C), std::vector<A>(B * C)};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const A* yb = in.y + b * M;
      const A mu = f.mu[b] = A(chunked_sum<A>(M, [&](int64_t k, int64_t n) { return load(yb + k, n); }) / M);
      const double fp32_var = chunked_sum<A>(M, [&](int64_t k, int64_t n) {
        auto d = load(yb + k, n) - V(mu);
        return V::set(V(0), d * d, n);  // lanes past n would add mu^2
      });
      const double var = overflow_safe_sum_sq<A>(fp32_var, yb, 1, M, M, mu);
      const A rstd = A(1 / std::sqrt(var / M + double(in.eps)));
      for (int64_t c = 0; c < C; ++c) {
        const A g = in.gn_w[c] * rstd, i = b * C + c;
        f.aq[i] = in.wq[c] * g;
        f.bq[i] = in.wq[c] * in.gn_b[c] + (in.bq ? in.bq[c] : A(0));
        f.ak[i] = in.wk[c] * g;
        f.bk[i] = in.wk[c] * in.gn_b[c] + (in.bk ? in.bk[c] : A(0));
        V ysum(0);
        for_lanes<A>(N, [&](int64_t n0, int64_t n) { ysum += load(yb + c * N + n0, n); });
        f.vbar[i] = in.wv[c] * g * (reduce_sum(ysum) / A(N) - mu) + in.wv[c] * in.gn_b[c] + (in.bv ? in.bv[c] : A(0));
      }
    }
  });
  return f;
}

// One task's view of a head: K^T (N x D, padded to whole vectors), vbar, the per-position key
// extremes, and the softmax sums of one query row q (N values, in log2 units) against them.
template <typename A>
struct HeadScorer {
  using V = Vectorized<A>;
  static constexpr int64_t L = V::size();
  const int64_t N, D, Dp;
  std::vector<A> kt, vbar, q, row;
  A kmax = 0, kmin = 0;  // N == 1: the extremes of the head's keys
  V tail_v;              // added to the last vector of scores: padding lanes get kPadScore, so exp2() makes them 0

  HeadScorer(int64_t N_, int64_t D_) : N(N_), D(D_), Dp((D_ + L - 1) / L * L), kt(N_ * Dp), vbar(Dp), q(N_), row(Dp) {
    alignas(64) A tail[L];
    for (int64_t l = 0; l < L; ++l) tail[l] = (Dp - L + l) < D ? A(0) : A(kPadScore);
    tail_v = V::loadu(tail);
  }

  // K^T, vbar and (N == 1) the keys' extremes of the head at channel c0 of sample b.
  void stage(const A* yb, const Affine<A>& f, int64_t b, int64_t C, int64_t c0) {
    std::fill(kt.begin(), kt.end(), A(0));
    std::fill(vbar.begin(), vbar.end(), A(0));
    for (int64_t j = 0; j < D; ++j) {
      const int64_t i = b * C + c0 + j;
      for (int64_t n = 0; n < N; ++n) kt[n * Dp + j] = f.ak[i] * (yb[(c0 + j) * N + n] - f.mu[b]) + f.bk[i];
      vbar[j] = f.vbar[i];
    }
    if (N == 1) {
      V mx(static_cast<A>(kPadScore)), mn(A(-kPadScore));
      for_lanes<A>(D, [&](int64_t j, int64_t m) {
        const V k = V::loadu(kt.data() + j);
        mx = at::vec::maximum(mx, V::set(V(A(kPadScore)), k, m));
        mn = at::vec::minimum(mn, V::set(V(A(-kPadScore)), k, m));
      });
      kmax = reduce_max(mx), kmin = -reduce_max(mn.neg());  // neg(): older at::vec has no unary minus
    }
  }

  // Scores of NU key vectors at once (NU a constant, so they stay in registers): independent
  // accumulators let the N-long fmadd chains (and, for N == 1, the exponentials) overlap. Where
  // the register file holds twice NU accumulators, odd n go into a second set: twice the chains in
  // flight. AVX2's 16 registers do not hold 2 x 8 and the two broadcasts: there the split would
  // spill accumulators to the stack in every step, so AVX2 keeps one set.
  // Each starts from `from` (minus the row's max: the subtraction rides in the fmadd chain).
  template <int NU>
  void scores(int64_t j0, V* s, A from) const {
    constexpr bool split = 2 * NU + 2 <= kVectorRegisters;
    V odd[NU];
    for (int u = 0; u < NU; ++u) s[u] = V(from), odd[u] = V(0);
    const A* k = kt.data() + j0;
    int64_t n = 0;
    if constexpr (split) {
      for (; n + 1 < N; n += 2, k += 2 * Dp) {
        const V q0(q[n]), q1(q[n + 1]);
        for (int u = 0; u < NU; ++u) {
          s[u] = at::vec::fmadd(q0, V::loadu(k + u * L), s[u]);
          odd[u] = at::vec::fmadd(q1, V::loadu(k + Dp + u * L), odd[u]);
        }
      }
    }
    for (; n < N; ++n, k += Dp) {
      const V qn(q[n]);
      for (int u = 0; u < NU; ++u) s[u] = at::vec::fmadd(qn, V::loadu(k + u * L), s[u]);
    }
    if constexpr (split)
      for (int u = 0; u < NU; ++u) s[u] = s[u] + odd[u];
    if (j0 + NU * L == Dp) s[NU - 1] = s[NU - 1] + tail_v;
  }

  // f(j0, NU, scores of NU vectors from j0) over every key vector: blocks of kBlock, kBlock / 2, 1.
  template <int NU, typename F>
  int64_t blocks_of(int64_t j0, A from, const F& f) const {
    V s[NU];
    for (; j0 + NU * L <= Dp; j0 += NU * L) {
      scores<NU>(j0, s, from);
      f(j0, NU, s);
    }
    return j0;
  }
  template <typename F>
  void for_blocks(A from, const F& f) const {
    const int64_t j0 = blocks_of<kBlock>(0, from, f);
    blocks_of<1>(blocks_of<kBlock / 2>(j0, from, f), from, f);
  }

  void softmax_dot(A m, A& num, A& den) const {
    V vn(0), vd(0);
    for_blocks(-m, [&](int64_t j0, int nu, const V* s) {
      for (int u = 0; u < nu; ++u) {
        const V p = exp2(s[u]);
        vd += p;
        vn = at::vec::fmadd(p, V::loadu(vbar.data() + j0 + u * L), vn);
      }
    });
    num = reduce_sum(vn), den = reduce_sum(vd);
  }

  // The same sums against the row's exact max, from scores computed once into `row` (N > 1: an
  // upper bound of the max, sum_n max_j q_n K[n, j], would overshoot it by a multiple of the
  // scores' spread, and exp2(s - bound) then carries the bound's rounding into every term).
  void softmax_dot_exact(A& num, A& den) {
    V mx(static_cast<A>(kPadScore));
    for_blocks(A(0), [&](int64_t j0, int nu, const V* s) {
      for (int u = 0; u < nu; ++u) {
        s[u].store(row.data() + j0 + u * L);
        mx = at::vec::maximum(mx, s[u]);
      }
    });
    const V m(reduce_max(mx));
    V vn(0), vd(0);
    for (int64_t j = 0; j < Dp; j += L) {
      const V p = exp2(V::loadu(row.data() + j) - m);
      vd += p;
      vn = at::vec::fmadd(p, V::loadu(vbar.data() + j), vn);
    }
    num = reduce_sum(vn), den = reduce_sum(vd);
  }

  A row_max() const {
    V mx(static_cast<A>(kPadScore));
    for_blocks(A(0), [&](int64_t, int nu, const V* s) {
      for (int u = 0; u < nu; ++u) mx = at::vec::maximum(mx, s[u]);
    });
    return reduce_max(mx);
  }
};

// Rows [r0, r1) of the head at c0 by the power series (N == 1); done[r - r0]: rows it answered.
template <typename A>
void rank_one_rows(const A* yb, const Affine<A>& f, const Moments& mom, int64_t b, int64_t C, int64_t c0, int64_t D,
                   int64_t r0, int64_t r1, A* o, bool* done) {
  using VD = Vectorized<double>;
  const double inv_sqrt_d = 1 / std::sqrt(double(D));
  alignas(64) double x[kRowsPerTask], ratio[kRowsPerTask];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = b * C + c0 + r;
    x[r - r0] = double(f.aq[i] * (yb[c0 + r] - f.mu[b]) + f.bq[i]) * inv_sqrt_d;
  }
  for_lanes<double>(r1 - r0, [&](int64_t r, int64_t n) {
    const VD xv = load(x + r, n);
    VD num(mom.num[kTerms - 1]), den(mom.den[kTerms - 1]);
    for (int p = kTerms - 2; p >= 0; --p)
      num = at::vec::fmadd(num, xv, VD(mom.num[p])), den = at::vec::fmadd(den, xv, VD(mom.den[p]));
    store(ratio + r, num / den, n);
  });
  for (int64_t r = r0; r < r1; ++r)
    if ((done[r - r0] = std::abs(x[r - r0]) * mom.rad <= kMaxRadius)) o[b * C + c0 + r] = A(ratio[r - r0]);
}

// One query row's o. N == 1 (7x7 maps under a 7x7 window): the row's max is exactly q * kmax or
// q * kmin, so scores, exponentials and sums take one pass; the fallback to the computed max only
// catches a NaN max. N > 1: the scores are stored once and normalised against their exact max.
template <typename A>
A softmax_row(HeadScorer<A>& hs, const A* yq, A aq, A bq, A mu) {
  const A q_scale = A(kLog2e) / std::sqrt(A(hs.D));
  const A min_den = std::numeric_limits<A>::min() * A(1 << 24);
  A num, den;
  for (int64_t n = 0; n < hs.N; ++n) hs.q[n] = (aq * (yq[n] - mu) + bq) * q_scale;
  if (hs.N > 1) {
    hs.softmax_dot_exact(num, den);
    return num / den;
  }
  hs.softmax_dot(hs.q[0] >= 0 ? hs.q[0] * hs.kmax : hs.q[0] * hs.kmin, num, den);
  if (!(den >= min_den)) hs.softmax_dot(hs.row_max(), num, den);
  return num / den;
}

template <typename A>
void channel_attention_impl(const Inputs<A>& in, A* o) {
  const int64_t C = in.C, N = in.N, heads = in.heads, D = C / heads;
  const Affine<A> f = fold_affines(in);
  const int64_t chunks = (D + kRowsPerTask - 1) / kRowsPerTask;
  const bool rank_one = N == 1 && std::is_same_v<A, float>;
  at::parallel_for(0, in.B * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    HeadScorer<A> hs(N, D);
    Moments mom{};
    bool done[kRowsPerTask];  // rank one: rows the power series answered
    int64_t staged = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, b = bh / heads, c0 = bh % heads * D;
      const A* yb = in.y + b * C * N;
      if (bh != staged) {
        hs.stage(yb, f, b, C, c0);
        if (rank_one) key_moments(hs.kt.data(), hs.vbar.data(), D, hs.kmax, hs.kmin, mom);
        staged = bh;
      }
      const int64_t r0 = t % chunks * kRowsPerTask, r1 = std::min(D, r0 + kRowsPerTask);
      if (rank_one) rank_one_rows(yb, f, mom, b, C, c0, D, r0, r1, o, done);
      for (int64_t r = r0; r < r1; ++r) {
        if (rank_one && done[r - r0]) continue;
        const int64_t i = b * C + c0 + r;
        o[i] = softmax_row(hs, yb + (c0 + r) * N, f.aq[i], f.bq[i], f.mu[b]);
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
    const Inputs<A> in{ptr(f.y) + b0 * C * N,
                       ptr(f.norm_c_weight),
                       ptr(f.norm_c_bias),
                       ptr(f.q_weight),
                       ptr(f.k_weight),
                       ptr(f.v_weight),
                       ptr(f.q_bias),
                       ptr(f.k_bias),
                       ptr(f.v_bias),
                       nb,
                       C,
                       N,
                       f.head_num,
                       A(f.eps)};
    channel_attention_impl<A>(in, f.o.data_ptr<A>() + b0 * C);
  });
}

}  // namespace scsa
