// F2 of DESIGN.md: the spatial gates a_h (B, C, H) and a_w (B, C, W) from the pooled sums.
// One task per (sample, channel group, branch): a channel group of the four depthwise convs is
// exactly a GroupNorm(4) group, so conv -> statistics -> normalise -> gate stays in one task.
// Vectorised along the length. Staging buffers give every channel its own whole vectors: a row
// of 7 or 14 values would otherwise share a vector with its neighbour, and a load of a row just
// written beside another stalls until the store retires.
#include <cmath>

#include "scsa.h"

namespace scsa {
namespace {

struct Branch {
  const void* sums;  // (B, C, L) sums of X along the other axis
  int64_t L, count;  // count: elements summed per mean
  const void* gn_w;
  const void* gn_b;
  void* out;  // (B, C, L)
};

template <typename A>
void gate_group(const Branch& br, int64_t b, int64_t grp, int64_t C, const A* conv_w, const A* conv_b, int64_t K,
                bool softmax, A eps) {
  using V = Vectorized<A>;
  constexpr int64_t Lanes = V::size();
  const int64_t G = C / 4, L = br.L, c0 = grp * G, pad = K / 2, Lp = L + 2 * pad;
  const int64_t Lv = (L + Lanes - 1) / Lanes * Lanes;
  const A* sums = static_cast<const A*>(br.sums) + (b * C + c0) * L;
  const A* gw = static_cast<const A*>(br.gn_w) + c0;
  const A* gb = static_cast<const A*>(br.gn_b) + c0;
  A* out = static_cast<A*>(br.out) + (b * C + c0) * L;
  // padded: each channel's sums with `pad` zeros on both sides (padded_rows). z: the conv output,
  // rows of Lv. Lanes past a row's end hold junk: `& keep(l)` clears them wherever they would be
  // summed, a precomputed mask where at::vec's partial loads would rebuild one per call (rows can
  // be 7 long). Rows of `out` are written as whole vectors in channel order, as padded_rows writes
  // its rows: a row's overhang of junk lands on later rows, which are written after it; a store
  // that would pass the group's end is partial.
  const std::vector<A> padded = padded_rows(sums, G, L, pad);
  std::vector<A> z(G * Lv);
  const V ones = V(0) == V(0), tail = V::set(V(0), ones, L - (Lv - Lanes));
  auto keep = [&](int64_t l) { return l + Lanes <= L ? ones : tail; };
  // The conv is linear: convolve the sums, scale to means once.
  const V inv_count(A(1) / A(br.count));
  V total(0);
  for (int64_t c = 0; c < G; ++c) {
    const A* m = padded.data() + c * Lp;
    const A* w = conv_w + c * K;
    for (int64_t l = 0; l < L; l += Lanes) {
      V acc(0);
      for (int64_t t = 0; t < K; ++t) acc = at::vec::fmadd(V(w[t]), V::loadu(m + l + t), acc);
      acc = at::vec::fmadd(acc, inv_count, V(conv_b[c]));
      acc.store(z.data() + c * Lv + l);
      total += acc & keep(l);
    }
  }
  const int64_t M = G * L;
  const A mu = reduce_sum(total) / A(M);
  V sq(0);
  for (int64_t c = 0; c < G; ++c)
    for (int64_t l = 0; l < L; l += Lanes) {
      const auto d = V::loadu(z.data() + c * Lv + l) - V(mu);
      sq += (d * d) & keep(l);
    }
  const A sum_sq = reduce_sum(sq);
  const A rstd = std::isfinite(sum_sq)
                     ? A(1) / std::sqrt(sum_sq / A(M) + eps)
                     : A(1 / std::sqrt(overflow_safe_sum_sq<A>(sum_sq, z.data(), G, L, Lv, mu) / M + double(eps)));
  // GroupNorm's affine per channel; for the sigmoid times -log2(e), for exp2. The mean is
  // subtracted, not folded into the shift, whose rounding |mu| / std(z) would amplify. Softmax
  // logits stay in natural units until the row max is subtracted: a finite logit near the fp32
  // limit times log2(e) would overflow, and inf - inf is NaN where the eager module is finite.
  const A to_log2 = A(kLog2e), to_neg_log2 = -to_log2;
  for (int64_t c = 0; c < G; ++c) {
    const A unit = softmax ? A(1) : to_neg_log2;
    const V scale(rstd * gw[c] * unit), shift(gb[c] * unit);
    const A* zc = z.data() + c * Lv;
    A* a = out + c * L;
    auto put = [&](int64_t l, int64_t n, const V& v) {
      if ((c * L + l + Lanes) <= G * L)
        v.store(a + l);
      else
        store(a + l, v, n);
    };
    auto logits = [&](int64_t l) { return at::vec::fmadd(V::loadu(zc + l) - V(mu), scale, shift); };
    if (!softmax) {
      for_lanes<A>(L, [&](int64_t l, int64_t n) { put(l, n, V(1) / (V(1) + exp2(logits(l)))); });
      continue;
    }
    V mx(static_cast<A>(kPadScore)), den(0);  // softmax over the length
    for (int64_t l = 0; l < L; l += Lanes) mx = at::vec::maximum(mx, V::blendv(V(A(kPadScore)), logits(l), keep(l)));
    const V row_max(reduce_max(mx)), log2e(to_log2);
    auto term = [&](int64_t l) { return exp2((logits(l) - row_max) * log2e); };
    for (int64_t l = 0; l < L; l += Lanes) den += term(l) & keep(l);
    const V inv(A(1) / reduce_sum(den));
    for_lanes<A>(L, [&](int64_t l, int64_t n) { put(l, n, term(l) * inv); });
  }
}

}  // namespace

void spatial_gate(Forward& f, const Part& part) {
  const int64_t C = f.C, H = f.H, W = f.W, b0 = part.b0;
  AT_DISPATCH_FLOATING_TYPES(f.ph.scalar_type(), "scsa_spatial_gate", [&] {
    using A = scalar_t;
    const Branch branches[2] = {
        {f.ph.const_data_ptr<A>() + b0 * C * H, H, W, f.norm_h_weight.const_data_ptr(), f.norm_h_bias.const_data_ptr(),
         f.ah.data_ptr<A>() + b0 * C * H},
        {f.pw.const_data_ptr<A>() + b0 * C * W, W, H, f.norm_w_weight.const_data_ptr(), f.norm_w_bias.const_data_ptr(),
         f.aw.data_ptr<A>() + b0 * C * W},
    };
    // One task per (sample, channel group, branch).
    const int64_t tasks = 2 * part.ng;
    at::parallel_for(0, part.nb * tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / tasks, grp = part.g0 + t % tasks / 2;
        gate_group<A>(branches[t % 2], b, grp, C, f.conv_w[grp].const_data_ptr<A>(), f.conv_b[grp].const_data_ptr<A>(),
                      f.kernel_sizes[grp], f.softmax, A(f.eps));
      }
    });
  });
}

}  // namespace scsa
