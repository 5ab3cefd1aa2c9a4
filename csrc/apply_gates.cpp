// F5 of DESIGN.md, out = X * a_h * a_w * a_c, and the backward's last full-size pass, which has
// the same shape: dX = (g * a_c + up(dY)) * a_h * a_w + dp_h / W + dp_w / H. One template,
// switched by kInputGrad. The channel gate a_c is computed here from the logits o (a softmax gate
// needs every channel of a sample).
#include "scsa.h"

namespace scsa {
namespace {

template <typename A>
struct Gates {
  const A *ah, *aw, *ac;    // (B, C, H), (B, C, W), (B, C)
  const A *dy, *dph, *dpw;  // input grad only: (B, C, HO, WO) already / (KH KW), (B, C, H), (B, C, W)
  int64_t H, W, kh, kw;
};

// Planes [begin, end). Everything the loops read is a local or a by-value argument: vector
// stores may alias any memory (GCC's unaligned vector types are may_alias), so values read through
// a lambda's captured references or a std::vector would be reloaded after every store.
template <typename T, bool kInputGrad>
void apply_planes(const T* src, T* dst, const Gates<acc_t<T>> g, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t H = g.H, W = g.W, HW = H * W, kh = g.kh, kw = g.kw, ho = H / kh, wo = W / kw;
  const int64_t Wv = (W + L - 1) / L * L;  // rows of the staging buffers, zero padded
#if defined(CPU_CAPABILITY_AVX512)
  const bool flat = false;  // AVX512 loads and stores partial vectors natively, under a lane mask
#else
  const bool flat = W % L != 0;
#endif
  // col: the column gate (a_w a_c forward, a_w for dX); up: a row of dY spread over its windows;
  // mul, add: a flat plane's gates, each row stored as whole vectors (the overhang is overwritten
  // by the next row).
  std::vector<A> buf(Wv * 3 + (flat ? (HW + Wv) * (kInputGrad ? 2 : 1) : 0), A(0));
  A *const col = buf.data(), *const up = col + Wv, *const dpw = up + Wv, *const mul = dpw + Wv;
  A* const add = mul + HW + Wv;
  for (int64_t p = begin; p < end; ++p) {
    const A a_c = g.ac[p];
    const V ac(a_c);
    for (int64_t w = 0; w < W; ++w) {
      col[w] = kInputGrad ? g.aw[p * W + w] : g.aw[p * W + w] * a_c;
      if constexpr (kInputGrad) dpw[w] = g.dpw[p * W + w];
    }
    for (int64_t h = 0; h < H; ++h) {
      const V a_h(g.ah[p * H + h]);
      V dph(0);
      if constexpr (kInputGrad) {
        if (h % kh == 0) {  // a window row's dY spread over its columns (a division per column cost more than the row)
          std::fill(up, up + Wv, A(0));
          if (h < ho * kh) {
            const A* dy = g.dy + (p * ho + h / kh) * wo;
            for (int64_t j = 0; j < wo; ++j) std::fill(up + j * kw, up + (j + 1) * kw, dy[j]);
          }
        }
        dph = V(g.dph[p * H + h]);
      }
      const T* s = src + (p * H + h) * W;
      T* d = dst + (p * H + h) * W;
      prefetch_ahead<true>(d, W * int64_t(sizeof(T)));
      if (flat) {
        for (int64_t w = 0; w < W; w += L) {
          const V m = a_h * V::loadu(col + w);
          m.store(mul + h * W + w);
          if constexpr (kInputGrad) at::vec::fmadd(V::loadu(up + w), m, dph + V::loadu(dpw + w)).store(add + h * W + w);
        }
        continue;
      }
      auto gated = [&](int64_t w, int64_t n) {
        const V m = a_h * V::loadu(col + w);
        if constexpr (kInputGrad)
          return at::vec::fmadd(at::vec::fmadd(load(s + w, n), ac, V::loadu(up + w)), m, dph + V::loadu(dpw + w));
        else
          return load(s + w, n) * m;
      };
      int64_t w = 0;
      for (; w + L <= W; w += L) store(d + w, gated(w, L), L);
      if (w < W) store(d + w, gated(w, W - w), W - w);
    }
    if (!flat) continue;
    const T* s = src + p * HW;
    T* d = dst + p * HW;
    auto gated = [&](int64_t i, int64_t n) {
      if constexpr (kInputGrad)
        return at::vec::fmadd(load(s + i, n), ac * V::loadu(mul + i), V::loadu(add + i));
      else
        return load(s + i, n) * V::loadu(mul + i);
    };
    int64_t i = 0;
    for (; i + L <= HW; i += L) store(d + i, gated(i, L), L);
    if (i < HW) store(d + i, gated(i, HW - i), HW - i);
  }
}

// Planes of the NCHW layout; src is X or g, dst is out or dX, streamed row by row. On AVX2 and
// DEFAULT a row of 7, 14 or 28 (every ResNet map) would end in a partial vector, a masked load and
// a store through a buffer, each row: such planes first lay their gates out as the plane is (mul =
// a_h a_w, and for dX add = up(dY) mul + dp_h / W + dp_w / H), then stream as one flat run of
// whole vectors, partial only at the plane's end.
template <typename T, bool kInputGrad>
void apply_nchw(const T* src, T* dst, const Gates<acc_t<T>>& g, int64_t planes) {
  at::parallel_for(0, planes, grain(g.H * g.W),
                   [&](int64_t begin, int64_t end) { apply_planes<T, kInputGrad>(src, dst, g, begin, end); });
}

// channels_last: tasks are (sample, channel block, band of rows); gates are staged transposed to
// [position][channel] so the vector loop runs along C like the data.
template <typename T, bool kInputGrad>
void apply_nhwc(const T* src, T* dst, const Gates<acc_t<T>>& g, int64_t B, int64_t C) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t H = g.H, W = g.W, ho = H / g.kh, wo = W / g.kw;
  const int64_t cb = std::min(C, kChannelBlock), nblk = (C + cb - 1) / cb;
  // Rows per task: each task stages the gates of its channel block (W x 64 values) once, and 16
  // rows of work amortise that while keeping tasks for two threads at 7x7.
  constexpr int64_t rows = 16;
  const int64_t bands = (H + rows - 1) / rows;
  at::parallel_for(0, B * nblk * bands, grain(rows * W * cb), [&](int64_t begin, int64_t end) {
    std::vector<A> col(W * cb), row(cb), ac(cb), dph(cb), dpw(kInputGrad ? W * cb : 0), up(kInputGrad ? wo * cb : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (nblk * bands), c0 = t / bands % nblk * cb, cn = std::min(cb, C - c0);
      const int64_t h0 = t % bands * rows, h1 = std::min(H, h0 + rows);
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t bc = b * C + c0 + c;
        ac[c] = g.ac[bc];
        for (int64_t w = 0; w < W; ++w) {
          col[w * cb + c] = kInputGrad ? g.aw[bc * W + w] : g.aw[bc * W + w] * ac[c];
          if constexpr (kInputGrad) dpw[w * cb + c] = g.dpw[bc * W + w];
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        const bool covered = h < ho * g.kh;
        for (int64_t c = 0; c < cn; ++c) {
          const int64_t bc = b * C + c0 + c;
          row[c] = g.ah[bc * H + h];
          if constexpr (kInputGrad) {
            dph[c] = g.dph[bc * H + h];
            if (covered)
              for (int64_t j = 0; j < wo; ++j) up[j * cb + c] = g.dy[(bc * ho + h / g.kh) * wo + j];
          }
        }
        for (int64_t w = 0; w < W; ++w) {
          const T* s = src + ((b * H + h) * W + w) * C + c0;
          T* d = dst + ((b * H + h) * W + w) * C + c0;
          const A* cw = col.data() + w * cb;
          for_lanes<A>(cn, [&](int64_t c, int64_t n) {
            auto gate = load(row.data() + c, n) * load(cw + c, n);
            if constexpr (kInputGrad) {
              auto dxs = load(s + c, n) * load(ac.data() + c, n);
              if (covered && w < wo * g.kw) dxs = dxs + load(up.data() + w / g.kw * cb + c, n);
              store(d + c, dxs * gate + load(dph.data() + c, n) + load(dpw.data() + w * cb + c, n), n);
            } else {
              store(d + c, load(s + c, n) * gate, n);
            }
          });
        }
      }
    }
  });
}

template <bool kInputGrad, typename A>
void dispatch(const Tensor& src, Tensor& dst, bool channels_last, const Gates<A>& g, int64_t b0, int64_t nb,
              int64_t C) {
  const int64_t off = b0 * C * g.H * g.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "scsa_apply_gates", [&] {
    if constexpr (std::is_same_v<acc_t<scalar_t>, A>) {
      const auto* s = src.const_data_ptr<scalar_t>() + off;
      auto* d = dst.data_ptr<scalar_t>() + off;
      if (channels_last)
        apply_nhwc<scalar_t, kInputGrad>(s, d, g, nb, C);
      else
        apply_nchw<scalar_t, kInputGrad>(s, d, g, nb * C);
    }
  });
}

}  // namespace

void apply_gates(Forward& f, int64_t b0, int64_t nb) {
  const int64_t C = f.C;
  AT_DISPATCH_FLOATING_TYPES(f.o.scalar_type(), "scsa_channel_gate", [&] {
    using A = scalar_t;
    std::vector<A> ac(nb * C);
    channel_gate(f.o.const_data_ptr<A>() + b0 * C, ac.data(), nb, C, f.softmax);
    const Gates<A> g{f.ah.const_data_ptr<A>() + b0 * C * f.H,
                     f.aw.const_data_ptr<A>() + b0 * C * f.W,
                     ac.data(),
                     nullptr,
                     nullptr,
                     nullptr,
                     f.H,
                     f.W,
                     1,
                     1};
    dispatch<false>(f.x, f.out, f.channels_last, g, b0, nb, C);
  });
}

void input_grad_samples(const Tensor& g, Tensor& dx, bool channels_last, const Tensor& ah, const Tensor& aw,
                        const Tensor& o, const Tensor& dy, const Tensor& dph, const Tensor& dpw, int64_t kh, int64_t kw,
                        bool softmax, int64_t b0, int64_t nb) {
  const int64_t C = dx.size(1), H = dx.size(2), W = dx.size(3);
  AT_DISPATCH_FLOATING_TYPES(ah.scalar_type(), "scsa_input_grad", [&] {
    using A = scalar_t;
    std::vector<A> ac(nb * C);
    channel_gate(o.const_data_ptr<A>() + b0 * C, ac.data(), nb, C, softmax);
    const Gates<A> gates{ah.const_data_ptr<A>() + b0 * C * H,
                         aw.const_data_ptr<A>() + b0 * C * W,
                         ac.data(),
                         dy.const_data_ptr<A>() + b0 * C * (H / kh) * (W / kw),
                         dph.const_data_ptr<A>() + b0 * C * H,
                         dpw.const_data_ptr<A>() + b0 * C * W,
                         H,
                         W,
                         kh,
                         kw};
    dispatch<true>(g, dx, channels_last, gates, b0, nb, C);
  });
}

Tensor input_grad(const Tensor& g_in, const Tensor& x_in, const Tensor& ah_in, const Tensor& aw_in, const Tensor& o_in,
                  const Tensor& dy_in, const Tensor& dph_in, const Tensor& dpw_in, int64_t kh, int64_t kw,
                  bool softmax) {
  check_x(x_in, "x");
  check_window(x_in, kh, kw);
  auto [x, channels_last] = dense(x_in);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = acc_dtype(x.scalar_type());
  Tensor g = upstream(g_in, x, channels_last);
  Tensor ah = check_small(ah_in, "a_h", {B, C, H}, acc), aw = check_small(aw_in, "a_w", {B, C, W}, acc);
  Tensor o = check_small(o_in, "o", {B, C}, acc);
  Tensor dy = check_small(dy_in, "dy", {B, C, H / kh, W / kw}, acc);
  Tensor dph = check_small(dph_in, "dph", {B, C, H}, acc), dpw = check_small(dpw_in, "dpw", {B, C, W}, acc);
  Tensor dx = alloc(x.sizes(), x.options().memory_format(format_of(channels_last)));
  input_grad_samples(g, dx, channels_last, ah, aw, o, dy, dph, dpw, kh, kw, softmax, 0, B);
  return dx;
}

}  // namespace scsa
