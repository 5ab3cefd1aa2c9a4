// First full-size pass of the backward (DESIGN.md section 3): one read of g and X yields every
// sum the gate gradients need (the same outputs as the Triton gate_grads kernel):
//   R[b,c,h]    = sum_w g X a_w              (B, C, H)
//   S[b,c,i,w]  = sum_{h in row i} g X a_h   (B, C, HC, W), HC = cdiv(H, KH): leftover rows included
//   U[b,c,h,j]  = sum_{w in window j} X a_w  (B, C, HO * KH, WO)
//   V[b,c,i,w]  = sum_{h in row i} X a_h     (B, C, HO, WO * KW)
#include "scsa.h"

namespace scsa {
namespace {

struct Sums {
  void *r, *s, *u, *v;
};

// One window row of one plane (`rows` rows from g and x; `full`: a whole window row, which also
// feeds U and V), in runs of up to 8 vectors of columns: S's and V's sums and a_w stay in registers
// while the rows stream past, so a row costs its two loads (a store/load round trip of the sums per
// row bounded this pass well below the copy's speed). Out: each row's R partial (a vector, added
// over the runs), X a_w of each row for U's window sums, and the S and V rows in whole vectors.
template <typename T>
void window_row_sums(const T* g, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, int64_t W, int64_t rows, bool full,
                     Vectorized<acc_t<T>>* r_part, acc_t<T>* xaw, int64_t xaw_stride, acc_t<T>* s_row,
                     acc_t<T>* v_row) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  for_runs<A>(W, [&](auto run) {
    constexpr int NV = decltype(run)::size;
    const int64_t w0 = run.w0;
    V s[NV], v[NV], a_w[NV];
    for (int k = 0; k < NV; ++k) s[k] = V(0), v[k] = V(0), a_w[k] = load(aw + w0 + k * L, run.lanes(k));
    for (int64_t r = 0; r < rows; ++r) {
      const V a_h(ah[r]);
      const T *gr = g + r * W + w0, *xr = x + r * W + w0;
      prefetch_ahead(xr, NV * L * int64_t(sizeof(T)));
      prefetch_ahead(gr, NV * L * int64_t(sizeof(T)));
      V r_sum(0);
      for (int k = 0; k < NV; ++k) {
        const int64_t n = run.lanes(k);
        const auto xv = load(xr + k * L, n), gx = load(gr + k * L, n) * xv;
        r_sum = at::vec::fmadd(gx, a_w[k], r_sum);
        s[k] = at::vec::fmadd(gx, a_h, s[k]);
        if (full) {
          v[k] = at::vec::fmadd(xv, a_h, v[k]);
          (xv * a_w[k]).store(xaw + r * xaw_stride + w0 + k * L);
        }
      }
      r_part[r] = w0 == 0 ? r_sum : r_part[r] + r_sum;
    }
    for (int k = 0; k < NV; ++k) {
      s[k].store(s_row + w0 + k * L);
      if (full) v[k].store(v_row + w0 + k * L);
    }
  });
}

template <typename T>
void gate_grads_nchw(const T* g, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, const Sums& out, int64_t planes,
                     int64_t H, int64_t W, int64_t kh, int64_t kw) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t ho = H / kh, wo = W / kw, hc = (H + kh - 1) / kh, wc = wo * kw;
  A *R = static_cast<A*>(out.r), *S = static_cast<A*>(out.s), *U = static_cast<A*>(out.u), *Vs = static_cast<A*>(out.v);
  constexpr int64_t L = V::size();
  const int64_t Wv = (W + L - 1) / L * L;
  at::parallel_for(0, planes, grain(2 * H * W), [&](int64_t begin, int64_t end) {
    // xaw: window_sums reads a vector past a row's last window
    std::vector<A> xaw(kh * Wv + L), s_row(Wv), v_row(Wv);
    std::vector<V> r_part(kh);
    for (int64_t p = begin; p < end; ++p) {
      RowSums<A> r_sums{R + p * H, false};
      for (int64_t i = 0; i < hc; ++i) {
        const bool full = i < ho;  // a whole window row, not the leftover rows
        const int64_t h0 = i * kh, rows = std::min(H, h0 + kh) - h0;
        window_row_sums(g + (p * H + h0) * W, x + (p * H + h0) * W, ah + p * H + h0, aw + p * W, W, rows, full,
                        r_part.data(), xaw.data(), Wv, s_row.data(), v_row.data());
        for (int64_t r = 0; r < rows; ++r) r_sums.push(r_part[r]);
        std::copy(s_row.begin(), s_row.begin() + W, S + (p * hc + i) * W);
        if (full) {
          window_sums(xaw.data(), U + (p * ho * kh + h0) * wo, kw, wo, A(1), rows, Wv);
          std::copy(v_row.begin(), v_row.begin() + wc, Vs + (p * ho + i) * wc);
        }
      }
      r_sums.flush();
    }
  });
}

template <typename T>
void gate_grads_nhwc(const T* g, const T* x, const acc_t<T>* ah, const acc_t<T>* aw, const Sums& out, int64_t B,
                     int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t ho = H / kh, wo = W / kw, hc = (H + kh - 1) / kh, wc = wo * kw;
  const int64_t cb = std::min(C, kChannelBlock), nblk = (C + cb - 1) / cb;
  A *R = static_cast<A*>(out.r), *S = static_cast<A*>(out.s), *U = static_cast<A*>(out.u), *Vs = static_cast<A*>(out.v);
  // Tasks: (sample, channel block, window row); accumulators are [position][channel] like X.
  at::parallel_for(0, B * nblk * hc, grain(2 * kh * W * cb), [&](int64_t begin, int64_t end) {
    std::vector<A> aw_t(W * cb), ah_t(cb), r(cb), s(W * cb), v(wc * cb), u(wo * cb);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (nblk * hc), c0 = t / hc % nblk * cb, cn = std::min(cb, C - c0), i = t % hc;
      const bool full = i < ho;
      for (int64_t c = 0; c < cn; ++c)
        for (int64_t w = 0; w < W; ++w) aw_t[w * cb + c] = aw[(b * C + c0 + c) * W + w];
      std::fill(s.begin(), s.end(), A(0));
      std::fill(v.begin(), v.end(), A(0));
      for (int64_t h = i * kh; h < std::min(H, (i + 1) * kh); ++h) {
        for (int64_t c = 0; c < cn; ++c) ah_t[c] = ah[(b * C + c0 + c) * H + h];
        std::fill(r.begin(), r.end(), A(0));
        std::fill(u.begin(), u.end(), A(0));
        for (int64_t w = 0; w < W; ++w) {
          const int64_t off = ((b * H + h) * W + w) * C + c0;
          const bool windowed = full && w < wc;
          for_lanes<A>(cn, [&](int64_t c, int64_t n) {
            const auto xv = load(x + off + c, n), gx = load(g + off + c, n) * xv;
            const auto aw_v = load(aw_t.data() + w * cb + c, n), ah_v = load(ah_t.data() + c, n);
            store(r.data() + c, at::vec::fmadd(gx, aw_v, load(r.data() + c, n)), n);
            store(s.data() + w * cb + c, at::vec::fmadd(gx, ah_v, load(s.data() + w * cb + c, n)), n);
            if (windowed) {
              A* vw = v.data() + w * cb + c;
              store(vw, at::vec::fmadd(xv, ah_v, load(vw, n)), n);
              A* uj = u.data() + w / kw * cb + c;
              store(uj, at::vec::fmadd(xv, aw_v, load(uj, n)), n);
            }
          });
        }
        for (int64_t c = 0; c < cn; ++c) {
          const int64_t bc = b * C + c0 + c;
          R[bc * H + h] = r[c];
          if (full)
            for (int64_t j = 0; j < wo; ++j) U[(bc * ho * kh + h) * wo + j] = u[j * cb + c];
        }
      }
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t bc = b * C + c0 + c;
        for (int64_t w = 0; w < W; ++w) S[(bc * hc + i) * W + w] = s[w * cb + c];
        if (full)
          for (int64_t w = 0; w < wc; ++w) Vs[(bc * ho + i) * wc + w] = v[w * cb + c];
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> gate_grad_sums(int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                                                          int64_t kw, const at::TensorOptions& opts) {
  const int64_t ho = H / kh, wo = W / kw, hc = (H + kh - 1) / kh;
  return {alloc({B, C, H}, opts), alloc({B, C, hc, W}, opts), alloc({B, C, ho * kh, wo}, opts),
          alloc({B, C, ho, wo * kw}, opts)};
}

void gate_grads_samples(const Tensor& g, const Tensor& x, bool channels_last, const Tensor& ah, const Tensor& aw,
                        const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, int64_t kh, int64_t kw,
                        int64_t b0, int64_t nb) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scsa_gate_grads", [&] {
    using A = acc_t<scalar_t>;
    // Every tensor is sample-major (NCHW and NHWC alike): samples [b0, b0 + nb) are one slice.
    auto at_b0 = [&](const Tensor& t) { return t.data_ptr<A>() + b0 * (t.numel() / t.size(0)); };
    const Sums out{at_b0(r), at_b0(s), at_b0(u), at_b0(v)};
    const int64_t off = b0 * C * H * W;
    const auto *gp = g.const_data_ptr<scalar_t>() + off, *xp = x.const_data_ptr<scalar_t>() + off;
    const A *ahp = ah.const_data_ptr<A>() + b0 * C * H, *awp = aw.const_data_ptr<A>() + b0 * C * W;
    if (channels_last)
      gate_grads_nhwc(gp, xp, ahp, awp, out, nb, C, H, W, kh, kw);
    else
      gate_grads_nchw(gp, xp, ahp, awp, out, nb * C, H, W, kh, kw);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gate_grads(const Tensor& g_in, const Tensor& x_in, const Tensor& ah_in,
                                                      const Tensor& aw_in, int64_t kh, int64_t kw) {
  check_x(x_in, "x");
  check_window(x_in, kh, kw);
  auto [x, channels_last] = dense(x_in);
  Tensor g = upstream(g_in, x, channels_last);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = acc_dtype(x.scalar_type());
  Tensor ah = check_small(ah_in, "a_h", {B, C, H}, acc), aw = check_small(aw_in, "a_w", {B, C, W}, acc);
  auto [r, s, u, v] = gate_grad_sums(B, C, H, W, kh, kw, ah.options());
  gate_grads_samples(g, x, channels_last, ah, aw, r, s, u, v, kh, kw, 0, B);
  return {r, s, u, v};
}

}  // namespace scsa
