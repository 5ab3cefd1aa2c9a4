// The backward of F2 (DESIGN.md 3.2) for one sample and one branch: the gate, GroupNorm(4) and the
// four depthwise convs, differentiated by hand. The gate itself is the forward's saved a_h / a_w;
// the conv output z is recomputed (G x L per group, as cheap as reading it back). Both branches add
// into the same conv partials (the convs are shared by the H and W branches).
#include <cmath>

#include "scsa.h"

namespace scsa {
namespace {

// One channel group (G channels, kernel K) of one branch.
template <typename A>
struct Group {
  const A *mean, *a, *da, *w, *bias, *gamma;  // mean, a, da: (G, L); w: (G, K); bias, gamma: (G)
  A *dw, *db, *dgamma, *dbeta, *dsum;         // partials; dsum: dL/d(sums along the other axis), (G, L)
  int64_t G, L, K, count;
  bool padded_taps;  // whether a tap's weight gradient also sums the zero padding (see below)
};

// z = conv(mean) + bias (zero padding), its GroupNorm statistics over G x L, and zhat.
template <typename A>
A normalised(const Group<A>& g, const std::vector<A>& mean_padded, A eps, std::vector<A>& zhat) {
  using V = Vectorized<A>;
  const int64_t G = g.G, L = g.L, K = g.K, Lp = L + 2 * (K / 2), M = G * L;
  for (int64_t c = 0; c < G; ++c) {
    const A *m = mean_padded.data() + c * Lp, *w = g.w + c * K;
    for_lanes<A>(L, [&](int64_t l, int64_t n) {
      V z(g.bias[c]);
      for (int64_t t = 0; t < K; ++t) z = at::vec::fmadd(V(w[t]), V::loadu(m + l + t), z);
      store(zhat.data() + c * L + l, z, n);
    });
  }
  const auto [mu, rstd] = fp64_mean_rstd(zhat.data(), M, double(eps));  // over the group's G L terms
  for (int64_t i = 0; i < M; ++i) zhat[i] = (zhat[i] - mu) * rstd;
  return rstd;
}

template <typename A>
void group_backward(const Group<A>& g, bool softmax, A eps) {
  using V = Vectorized<A>;
  const int64_t G = g.G, L = g.L, K = g.K, pad = K / 2, M = G * L, Lp = L + 2 * pad;
  std::vector<A> zhat(M), dz(M);
  const std::vector<A> mean_padded = padded_rows(g.mean, G, L, pad);
  const A rstd = normalised(g, mean_padded, eps, zhat);
  // Gate and affine; dz holds dL/dzhat until the normalisation's backward below.
  for (int64_t c = 0; c < G; ++c) {
    const A *a = g.a + c * L, *da = g.da + c * L;
    A dot = 0;
    if (softmax)
      for (int64_t l = 0; l < L; ++l) dot += da[l] * a[l];
    A sg = 0, sb = 0;
    for (int64_t l = 0; l < L; ++l) {
      const A dzn = softmax ? a[l] * (da[l] - dot) : da[l] * a[l] * (A(1) - a[l]);
      const int64_t i = c * L + l;
      sg += dzn * zhat[i], sb += dzn;
      dz[i] = g.gamma[c] * dzn;
    }
    g.dgamma[c] = sg, g.dbeta[c] = sb;
  }
  const A md = A(fp64_sum(M, [&](int64_t i) { return double(dz[i]); }) / M);
  const A mdz = A(fp64_sum(M, [&](int64_t i) { return double(dz[i]) * zhat[i]; }) / M);
  for (int64_t i = 0; i < M; ++i) dz[i] = rstd * (dz[i] - md - zhat[i] * mdz);
  // The conv: bias, weight, and its input (a mean of `count` values: / count for the sums).
  const A per_sum = A(1) / A(g.count);
  const std::vector<A> dz_padded = padded_rows(dz.data(), G, L, pad);
  for (int64_t c = 0; c < G; ++c) {
    const A *d = dz.data() + c * L, *m = mean_padded.data() + c * Lp, *w = g.w + c * K;
    A sb = 0;
    for (int64_t l = 0; l < L; ++l) sb += d[l];
    g.db[c] += sb;
    // With padded_taps a tap sums over every position, the zero padding included, so a NaN or Inf
    // in dz reaches the gradient of a tap that only ever sees padding (L <= |t - K/2|), as it does
    // in the eager conv's weight gradient; without, only the valid positions. (Tap t reads the
    // input at l + t - pad: m[l + t] in the padded row.)
    if (g.padded_taps && K <= V::size()) {
      // Every tap at once, lane t summing d[l] m[l + t] over the row: one fma a position where a
      // tap at a time ends in a lane reduction a tap (short rows: 7x7 and 14x14 maps).
      V s(0);
      for (int64_t l = 0; l < L; ++l) s = at::vec::fmadd(V(d[l]), V::loadu(m + l), s);
      store(g.dw + c * K, load(g.dw + c * K, K) + s, K);
    } else {
      for (int64_t t = 0; t < K; ++t) {
        const int64_t l0 = g.padded_taps ? 0 : std::max<int64_t>(0, pad - t);
        const int64_t l1 = g.padded_taps ? L : std::min(L, L + pad - t);
        V s(0);
        for_lanes<A>(l1 - l0, [&](int64_t i, int64_t n) {
          s = at::vec::fmadd(load(d + l0 + i, n), load(m + l0 + i + t, n), s);
        });
        g.dw[c * K + t] += reduce_sum(s);
      }
    }
    // dL/dmean at l: sum over taps of w[t] dz[l - t + pad], the padded row's l + 2 pad - t.
    const A* dp = dz_padded.data() + c * Lp;
    for_lanes<A>(L, [&](int64_t l, int64_t n) {
      V s(0);
      for (int64_t t = 0; t < K; ++t) s = at::vec::fmadd(V(w[t]), V::loadu(dp + l + 2 * pad - t), s);
      store(g.dsum + c * L + l, s * V(per_sum), n);
    });
  }
}

// Which of the two the eager module's conv1d weight gradient does (torch 2.13 on CPU): its
// kernel-3 depthwise path for fp32 and bf16 sums only the valid positions, every other case the
// padding too. It matters only where dz holds NaN or Inf.
bool padded_taps(int64_t K, at::ScalarType dtype) {
  return !(K == 3 && (dtype == at::kFloat || dtype == at::kBFloat16));
}

}  // namespace

template <typename A>
void spatial_gate_backward(Backward& bw, int64_t b, bool branch_w, const A* da) {
  const int64_t C = bw.C, G = C / 4, L = branch_w ? bw.W : bw.H, count = branch_w ? bw.H : bw.W;
  const A* sums = (branch_w ? bw.pw : bw.ph).template const_data_ptr<A>() + b * C * L;
  const A* a = (branch_w ? bw.aw : bw.ah).template const_data_ptr<A>() + b * C * L;
  const A* gamma = (branch_w ? bw.norm_w_weight : bw.norm_h_weight).template const_data_ptr<A>();
  A* part = bw.partials.data_ptr<A>() + b * bw.partials.size(1);
  const int norm = branch_w ? kNormW : kNormH;
  A* dsum = (branch_w ? bw.dpw : bw.dph).template data_ptr<A>() + b * C * L;
  std::vector<A> mean(G * L);
  for (int grp = 0; grp < 4; ++grp) {
    const int64_t c0 = grp * G;
    for (int64_t i = 0; i < G * L; ++i) mean[i] = sums[c0 * L + i] / A(count);
    const Group<A> g{mean.data(),
                     a + c0 * L,
                     da + c0 * L,
                     bw.conv_w[grp].const_data_ptr<A>(),
                     bw.conv_b[grp].const_data_ptr<A>(),
                     gamma + c0,
                     part + bw.at[kConvW + grp],
                     part + bw.at[kConvB + grp],
                     part + bw.at[norm] + c0,
                     part + bw.at[norm + 1] + c0,
                     dsum + c0 * L,
                     G,
                     L,
                     bw.kernel_sizes[grp],
                     count,
                     padded_taps(bw.kernel_sizes[grp], bw.dtype)};
    group_backward(g, bw.softmax, A(bw.eps));
  }
}

template void spatial_gate_backward<float>(Backward&, int64_t, bool, const float*);
template void spatial_gate_backward<double>(Backward&, int64_t, bool, const double*);

}  // namespace scsa
