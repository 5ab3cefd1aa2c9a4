// The backward of F4 (DESIGN.md 3.2) for one sample: the channel gate, the per-head softmax over
// key channels, q/k/v and GroupNorm(1), differentiated by hand. Channels are the tokens and the N
// pooled positions the features, so every (position, channel) array here is stored transposed,
// [n * C + c]: the loops over key channels then run in whole vectors, also when N is 1 (7x7 maps
// under a 7x7 window, global pooling). A query row's probabilities are recomputed from its scores
// (D exponentials), as flash attention's backward does, and never stored as a D x D matrix.
#include <cmath>

#include "rank_one.h"
#include "scsa.h"

namespace scsa {
namespace {

// Sample b's pooled map normalised and projected: Yhat, Yn, Q, K (all [n * C + c]), vbar (C).
template <typename A>
struct Projected {
  A mu, rstd;
  std::vector<A> yhat, yn, q, k, vbar;
};

template <typename A>
Projected<A> project(const Backward& bw, int64_t b) {
  const int64_t C = bw.C, N = bw.y.size(2), M = C * N;
  const A* y = bw.y.const_data_ptr<A>() + b * M;
  const A *gamma = bw.norm_c_weight.const_data_ptr<A>(), *beta = bw.norm_c_bias.const_data_ptr<A>();
  const A *wq = bw.q_weight.const_data_ptr<A>(), *wk = bw.k_weight.const_data_ptr<A>();
  const A* wv = bw.v_weight.const_data_ptr<A>();
  const bool bias = bw.q_bias.defined();
  Projected<A> p{0, 0, std::vector<A>(M), std::vector<A>(M), std::vector<A>(M), std::vector<A>(M), std::vector<A>(C)};
  // Two-pass statistics. Sums over a whole sample (C N terms) and a channel (N) accumulate in fp64.
  std::tie(p.mu, p.rstd) = fp64_mean_rstd(y, M, bw.eps);
  for (int64_t c = 0; c < C; ++c) {
    const A bq = bias ? bw.q_bias.const_data_ptr<A>()[c] : A(0), bk = bias ? bw.k_bias.const_data_ptr<A>()[c] : A(0);
    const A bv = bias ? bw.v_bias.const_data_ptr<A>()[c] : A(0);
    double vsum = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t t = n * C + c;
      const A yh = p.yhat[t] = (y[c * N + n] - p.mu) * p.rstd, yn = p.yn[t] = gamma[c] * yh + beta[c];
      p.q[t] = wq[c] * yn + bq;
      p.k[t] = wk[c] * yn + bk;
      vsum += wv[c] * yn + bv;
    }
    p.vbar[c] = A(vsum / N);
  }
  return p;
}

// N == 1: the rows of one head within kMaxRadius (rank_one.h) by power series, as the forward
// takes them. With x_i = s q_i, the keys centred (k_j = mid + d_j), Z_i = sum_j e^(x_i d_j) = den(x_i)
// and E_i[f] = sum_j e^(x_i d_j) f_j / Z_i:
//   o_i = num(x_i) / Z_i,  E_i[d] = den'(x_i) / Z_i,  E_i[v d] = num'(x_i) / Z_i,
//   dq_i = s do_i (E_i[v d] - o_i E_i[d])   (mid cancels);
// the key side sums over those rows are power series in d_j, with w_i = do_i / Z_i:
//   dvbar_j += sum_p d_j^p W_p,                 W_p = sum_i w_i x_i^p / p!,
//   dk_j += vbar_j sum_p d_j^p U_p - sum_p d_j^p T_p,  U_p = sum_i w_i x_i^(p+1) / p!, T_p = o_i-weighted U_p.
// Every |x_i d_j| <= |x_i| rad <= kMaxRadius, so the forward's truncation bound holds on both sides:
// O(D kTerms) per head instead of D^2 exponentials. by_series[i]: rows answered here; the others,
// and every row of a head with a non-finite key, value or do (which the exponential loop
// propagates as the eager module does), take the loop.
template <typename A>
void rank_one_backward(const Projected<A>& p, int64_t c0, int64_t D, A scale, const A* dO, A* dq, A* dk, A* dvbar,
                       char* by_series) {
  const A *k = p.k.data() + c0, *vbar = p.vbar.data() + c0;
  A kmax = k[0], kmin = k[0];
  for (int64_t j = 0; j < D; ++j) {
    if (!std::isfinite(k[j]) || !std::isfinite(vbar[j]) || !std::isfinite(dO[c0 + j])) return;
    kmax = std::max(kmax, k[j]), kmin = std::min(kmin, k[j]);
  }
  Moments m;
  key_moments(k, vbar, D, kmax, kmin, m);
  if (!(m.rad < std::numeric_limits<double>::infinity())) return;
  double W[kTerms] = {}, U[kTerms] = {}, T[kTerms] = {};
  for (int64_t i = 0; i < D; ++i) {
    const double x = double(p.q[c0 + i]) * double(scale);
    if (!(std::abs(x) * m.rad <= kMaxRadius)) continue;
    // Horner for den and num, with their derivatives alongside.
    double den = m.den[kTerms - 1], num = m.num[kTerms - 1], dden = 0, dnum = 0;
    for (int t = kTerms - 2; t >= 0; --t) {
      dden = dden * x + den, dnum = dnum * x + num;
      den = den * x + m.den[t], num = num * x + m.num[t];
    }
    const double o = num / den, w = double(dO[c0 + i]) / den;
    dq[c0 + i] = A(double(scale) * dO[c0 + i] * ((dnum - o * dden) / den));
    double power = 1;  // x^t / t!
    for (int t = 0; t < kTerms; ++t) {
      W[t] += w * power, U[t] += w * x * power, T[t] += w * o * x * power;
      power *= x / (t + 1);
    }
    by_series[i] = 1;
  }
  for (int64_t j = 0; j < D; ++j) {
    const double d = double(k[j]) - m.mid;
    double w = W[kTerms - 1], u = U[kTerms - 1], t = T[kTerms - 1];
    for (int r = kTerms - 2; r >= 0; --r) w = w * d + W[r], u = u * d + U[r], t = t * d + T[r];
    dvbar[c0 + j] += A(w);
    dk[c0 + j] += A(double(vbar[j]) * u - t);
  }
}

// dL/dQ and dL/dK ([n * C + c]) and dL/dvbar (C) of one head's channels [c0, c0 + D), given
// do = dL/do. Per query row i: P_i = softmax_j(S_ij), S_ij = s sum_n Q_in K_jn,
//   dvbar_j += P_ij do_i,  dS_ij = P_ij do_i (vbar_j - o_i),
//   dQ_in = s sum_j dS_ij K_jn,  dK_jn += s dS_ij Q_in.
template <typename A>
void head_backward(const Projected<A>& p, int64_t C, int64_t N, int64_t c0, int64_t D, const A* dO, A* dq, A* dk,
                   A* dvbar) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const A scale = A(1) / std::sqrt(A(D));
  const A* vbar = p.vbar.data() + c0;
  const int64_t Dv = (D + L - 1) / L * L;
  std::vector<A> score(D), prob(D), ds_rows(2 * Dv);
  std::vector<V> dq_sums(2 * N);
  const V none(-std::numeric_limits<A>::infinity()), log2e(static_cast<A>(kLog2e));
  // Query row i by its D exponentials: adds into dvbar; N == 1: adds into dk and writes dq, N > 1:
  // leaves dS * s in row `slot` of ds_rows for apply_rows.
  auto exact_row = [&](int64_t i, int64_t slot) {
    const int64_t ci = c0 + i;
    // Scores, and the row's exact max (-inf in the lanes past D: a finite start could exceed every
    // score). N == 1 (7x7 maps under a 7x7 window, global pooling): one pass for both.
    V mx = none;
    if (N == 1) {
      const V qv(p.q[ci] * scale);
      for_lanes<A>(D, [&](int64_t j, int64_t m) {
        const V sj = qv * load(p.k.data() + c0 + j, m);
        store(score.data() + j, sj, m);
        mx = at::vec::maximum(mx, V::set(none, sj, m));
      });
    } else {
      // Runs of up to 8 key vectors whose scores stay in registers while the N positions stream
      // past (a store/load round trip of every score per position bounded this loop); the max in
      // four chains (one chain through the row waits on each maximum's latency).
      V maxima[4] = {none, none, none, none};
      for_runs<A>(D, [&](auto run) {
        constexpr int NV = decltype(run)::size;
        const int64_t j0 = run.w0;
        V acc[NV];
        for (int k = 0; k < NV; ++k) acc[k] = V(0);
        for (int64_t n = 0; n < N; ++n) {
          const V qv(p.q[n * C + ci] * scale);
          const A* krow = p.k.data() + n * C + c0 + j0;
          for (int k = 0; k < NV; ++k) acc[k] = at::vec::fmadd(qv, load(krow + k * L, run.lanes(k)), acc[k]);
        }
        for (int k = 0; k < NV; ++k) {
          const int64_t m = run.lanes(k);
          store(score.data() + j0 + k * L, acc[k], m);
          maxima[k % 4] = at::vec::maximum(maxima[k % 4], V::set(none, acc[k], m));
        }
      });
      mx = at::vec::maximum(at::vec::maximum(maxima[0], maxima[1]), at::vec::maximum(maxima[2], maxima[3]));
    }
    // Exponentials, with their sum and their sum against vbar: o_i = num / den.
    const V shift(reduce_max(mx));
    V den(0), num(0);
    for_lanes<A>(D, [&](int64_t j, int64_t m) {
      const V e = V::set(V(0), exp2((load(score.data() + j, m) - shift) * log2e), m);
      den += e;
      num = at::vec::fmadd(e, load(vbar + j, m), num);
      store(prob.data() + j, e, m);
    });
    const A inv_den = A(1) / reduce_sum(den);
    const V inv(inv_den), o_i(reduce_sum(num) * inv_den), do_i(dO[ci]);
    // dS_ij * s of the key vector at j (0 in the lanes past D, whatever o_i), adding P_ij do_i into
    // dvbar on the way.
    auto ds_at = [&](int64_t j, int64_t m) {
      const V pj = load(prob.data() + j, m) * inv;
      store(dvbar + c0 + j, at::vec::fmadd(pj, do_i, load(dvbar + c0 + j, m)), m);
      return V::set(V(0), pj * do_i * (load(vbar + j, m) - o_i) * V(scale), m);
    };
    if (N == 1) {  // dS is used once: computed where it is used
      const A* krow = p.k.data() + c0;
      const V qn(p.q[ci]);
      V acc(0);
      for_lanes<A>(D, [&](int64_t j, int64_t m) {
        const V ds = ds_at(j, m);
        acc = at::vec::fmadd(ds, load(krow + j, m), acc);
        store(dk + c0 + j, at::vec::fmadd(ds, qn, load(dk + c0 + j, m)), m);
      });
      dq[ci] = reduce_sum(acc);
      return;
    }
    A* ds_row = ds_rows.data() + slot * Dv;
    for_lanes<A>(D, [&](int64_t j, int64_t m) { store(ds_row + j, ds_at(j, m), m); });
  };
  // N > 1: dq and dk of R consecutive rows from their dS in ds_rows. A run of up to 8 key vectors of
  // each row's dS stays in registers while the N positions stream past, and the rows share each
  // load of K and each load and store of dK (per row, those bounded this loop); dq's sums are
  // carried over the runs as vectors. Every sum takes its terms in the order of one row at a time.
  auto apply_rows = [&](int64_t i0, auto rows) {
    constexpr int R = decltype(rows)::value;
    std::fill(dq_sums.begin(), dq_sums.begin() + R * N, V(0));
    for_runs<A>(D, [&](auto run) {
      constexpr int NV = decltype(run)::size;
      const int64_t j0 = run.w0;
      V ds[R][NV];
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < NV; ++k) ds[r][k] = load(ds_rows.data() + r * Dv + j0 + k * L, run.lanes(k));
      for (int64_t n = 0; n < N; ++n) {
        const A* krow = p.k.data() + n * C + c0 + j0;
        A* dkrow = dk + n * C + c0 + j0;
        V qn[R], acc[R];
        for (int r = 0; r < R; ++r) qn[r] = V(p.q[n * C + c0 + i0 + r]), acc[r] = dq_sums[r * N + n];
        for (int k = 0; k < NV; ++k) {
          const int64_t m = run.lanes(k);
          const V kv = load(krow + k * L, m);
          V d = load(dkrow + k * L, m);
          for (int r = 0; r < R; ++r) {
            acc[r] = at::vec::fmadd(ds[r][k], kv, acc[r]);
            d = at::vec::fmadd(ds[r][k], qn[r], d);
          }
          store(dkrow + k * L, d, m);
        }
        for (int r = 0; r < R; ++r) dq_sums[r * N + n] = acc[r];
      }
    });
    for (int r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n) dq[n * C + c0 + i0 + r] = reduce_sum(dq_sums[r * N + n]);
  };
  if (N > 1) {
    int64_t i = 0;
    for (; i + 2 <= D; i += 2) {
      exact_row(i, 0), exact_row(i + 1, 1);
      apply_rows(i, std::integral_constant<int, 2>{});
    }
    if (i < D) exact_row(i, 0), apply_rows(i, std::integral_constant<int, 1>{});
    return;
  }
  std::vector<char> by_series(D, 0);
  if constexpr (std::is_same_v<A, float>) rank_one_backward(p, c0, D, scale, dO, dq, dk, dvbar, by_series.data());
  for (int64_t i = 0; i < D; ++i)
    if (!by_series[i]) exact_row(i, 0);
}

}  // namespace

template <typename A>
void channel_attention_backward(Backward& bw, int64_t b, const A* dA, A* ac) {
  const int64_t C = bw.C, N = bw.y.size(2), M = C * N, D = C / bw.head_num;
  const Projected<A> p = project<A>(bw, b);
  // The gate: do = dL/do.
  channel_gate(bw.o.const_data_ptr<A>() + b * C, ac, 1, C, bw.softmax);
  std::vector<A> dO(C), dq(M, A(0)), dk(M, A(0)), dvbar(C, A(0));
  double dot_sum = 0;
  for (int64_t c = 0; c < C; ++c) dot_sum += double(dA[c]) * ac[c];
  const A dot = A(dot_sum);
  for (int64_t c = 0; c < C; ++c) dO[c] = bw.softmax ? ac[c] * (dA[c] - dot) : dA[c] * ac[c] * (A(1) - ac[c]);
  for (int64_t c0 = 0; c0 < C; c0 += D) head_backward(p, C, N, c0, D, dO.data(), dq.data(), dk.data(), dvbar.data());

  // q/k/v (dV_cn = dvbar_c / N), then GroupNorm(1).
  A* part = bw.partials.data_ptr<A>() + b * bw.partials.size(1);
  A *dgamma = part + bw.at[kNormC], *dbeta = part + bw.at[kNormC + 1];
  A *dwq = part + bw.at[kQkvW], *dwk = part + bw.at[kQkvW + 1], *dwv = part + bw.at[kQkvW + 2];
  const A *gamma = bw.norm_c_weight.const_data_ptr<A>(), *wq = bw.q_weight.const_data_ptr<A>();
  const A *wk = bw.k_weight.const_data_ptr<A>(), *wv = bw.v_weight.const_data_ptr<A>();
  std::vector<A> dyhat(M);
  for (int64_t c = 0; c < C; ++c) {
    const A dv = dvbar[c] / A(N);
    double sq = 0, sk = 0, syn = 0, sg = 0, sb = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t t = n * C + c;
      const A yn = p.yn[t], dyn = wq[c] * dq[t] + wk[c] * dk[t] + wv[c] * dv;
      sq += double(dq[t]) * yn, sk += double(dk[t]) * yn, syn += yn;
      sg += double(dyn) * p.yhat[t], sb += dyn;
      dyhat[t] = gamma[c] * dyn;
    }
    dwq[c] = A(sq), dwk[c] = A(sk), dwv[c] = A(dv * syn);
    dgamma[c] = A(sg), dbeta[c] = A(sb);
    if (bw.q_bias.defined()) {
      double bq = 0, bk = 0;
      for (int64_t n = 0; n < N; ++n) bq += dq[n * C + c], bk += dk[n * C + c];
      part[bw.at[kQkvB] + c] = A(bq), part[bw.at[kQkvB + 1] + c] = A(bk), part[bw.at[kQkvB + 2] + c] = dvbar[c];
    }
  }
  const A md = A(fp64_sum(M, [&](int64_t t) { return double(dyhat[t]); }) / M);
  const A mdy = A(fp64_sum(M, [&](int64_t t) { return double(dyhat[t]) * p.yhat[t]; }) / M);
  // dL/dY, spread later over each window: / (KH KW).
  const A to_window = p.rstd / A(bw.kh * bw.kw);
  A* dy = bw.dy.data_ptr<A>() + b * M;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t t = n * C + c;
      dy[c * N + n] = (dyhat[t] - md - p.yhat[t] * mdy) * to_window;
    }
}

template void channel_attention_backward<float>(Backward&, int64_t, const float*, float*);
template void channel_attention_backward<double>(Backward&, int64_t, const double*, double*);

}  // namespace scsa
