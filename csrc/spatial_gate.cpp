// F2 of DESIGN.md: the spatial gates a_h (B, C, H) and a_w (B, C, W) from the pooled sums.
// One task per (sample, channel group, branch): a channel group of the four depthwise convs is
// exactly a GroupNorm(4) group, so conv -> statistics -> normalise -> gate stays in one task.
// Vectorised along the length axis: the B x C x (H + W) exponentials of the gates dominate.
#include <cmath>

#include "scsa.h"

namespace scsa {
namespace {

struct Branch {
  const void* sums;  // (parts, B, C, L) partial sums of X along the other axis
  int64_t parts, L, count;  // count: elements summed per mean
  const void* gn_w;
  const void* gn_b;
  void* out;  // (B, C, L)
};

template <typename A>
void gate_group(const Branch& br, int64_t b, int64_t grp, int64_t B, int64_t C, const A* conv_w,
                const A* conv_b, int64_t K, bool softmax, A eps) {
  using V = Vectorized<A>;
  const int64_t G = C / 4, L = br.L, c0 = grp * G, pad = K / 2, Lp = L + 2 * pad, M = G * L;
  const A* sums = static_cast<const A*>(br.sums);
  // Sums with `pad` zeros on each side of every channel, so the taps need no bounds checks. The
  // conv is linear: convolve the sums, scale to means once.
  std::vector<A> padded(G * Lp, A(0));
  for (int64_t part = 0; part < br.parts; ++part)
    for (int64_t cl = 0; cl < G; ++cl) {
      const A* src = sums + ((part * B + b) * C + c0 + cl) * L;
      A* dst = padded.data() + cl * Lp + pad;
      for (int64_t l = 0; l < L; ++l) dst[l] += src[l];
    }
  // The group's channels are contiguous in the (B, C, L) output: normalise and gate it flat.
  A* z = static_cast<A*>(br.out) + (b * C + c0) * L;
  const V inv_count(A(1) / A(br.count));
  for (int64_t cl = 0; cl < G; ++cl) {
    const A* m = padded.data() + cl * Lp;
    const A* w = conv_w + cl * K;
    for_lanes<A>(L, [&](int64_t l, int64_t n) {
      V acc(0);
      for (int64_t t = 0; t < K; ++t) acc = at::vec::fmadd(V(w[t]), V::loadu(m + l + t, n), acc);
      at::vec::fmadd(acc, inv_count, V(conv_b[cl])).store(z + cl * L + l, n);
    });
  }
  V total(0);
  for_lanes<A>(M, [&](int64_t k, int64_t n) { total += V::loadu(z + k, n); });
  const A mu = reduce_sum(total) / A(M);
  V sq(0);
  for_lanes<A>(M, [&](int64_t k, int64_t n) {
    const auto d = V::loadu(z + k, n) - V(mu);
    sq += V::set(V(0), d * d, n);
  });
  const A rstd = A(1) / std::sqrt(reduce_sum(sq) / A(M) + eps);
  const A* gw = static_cast<const A*>(br.gn_w) + c0;
  const A* gb = static_cast<const A*>(br.gn_b) + c0;
  for (int64_t cl = 0; cl < G; ++cl) {  // the GroupNorm affine is per channel
    const V scale(rstd * gw[cl]), shift(gb[cl] - mu * rstd * gw[cl]);
    for_lanes<A>(L, [&](int64_t l, int64_t n) {
      at::vec::fmadd(V::loadu(z + cl * L + l, n), scale, shift).store(z + cl * L + l, n);
    });
  }
  if (!softmax) {
    for_lanes<A>(M, [&](int64_t k, int64_t n) { (V(1) / (V(1) + V::loadu(z + k, n).neg().exp_u20())).store(z + k, n); });
    return;
  }
  for (int64_t cl = 0; cl < G; ++cl) {  // softmax over the length axis, per channel
    A* a = z + cl * L;
    const V mx(*std::max_element(a, a + L));
    V den(0);
    for_lanes<A>(L, [&](int64_t l, int64_t n) {
      const auto e = (V::loadu(a + l, n) - mx).exp_u20();
      e.store(a + l, n);
      den += V::set(V(0), e, n);
    });
    const V inv(A(1) / reduce_sum(den));
    for_lanes<A>(L, [&](int64_t l, int64_t n) { (V::loadu(a + l, n) * inv).store(a + l, n); });
  }
}

}  // namespace

void spatial_gate(Forward& f, int64_t b0, int64_t nb) {
  const int64_t C = f.C, H = f.H, W = f.W;
  AT_DISPATCH_FLOATING_TYPES(f.ph.scalar_type(), "scsa_spatial_gate", [&] {
    using A = scalar_t;
    const Branch branches[2] = {
        {f.ph.const_data_ptr<A>() + b0 * C * H, 1, H, W, f.norm_h_weight.const_data_ptr(),
         f.norm_h_bias.const_data_ptr(), f.ah.data_ptr<A>() + b0 * C * H},
        {f.pw.const_data_ptr<A>() + b0 * C * W, 1, W, H, f.norm_w_weight.const_data_ptr(),
         f.norm_w_bias.const_data_ptr(), f.aw.data_ptr<A>() + b0 * C * W},
    };
    at::parallel_for(0, nb * 8, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / 8, grp = t % 8 / 2;
        gate_group<A>(branches[t % 2], b, grp, nb, C, f.conv_w[grp].const_data_ptr<A>(),
                      f.conv_b[grp].const_data_ptr<A>(), f.kernel_sizes[grp], f.softmax, A(f.eps));
      }
    });
  });
}

}  // namespace scsa
