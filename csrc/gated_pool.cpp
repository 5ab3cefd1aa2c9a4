// F3 of DESIGN.md: Y = avg_pool(X * a_h * a_w) without storing X * a_h * a_w. a_h is constant
// along a row and a_w down a column, so rows are first summed with their a_h, then a_w is
// applied once per window row. Global pooling is the same pass with one window of H x W.
#include <optional>

#include "scsa.h"

namespace scsa {
namespace {

// One window row of one plane, in runs of up to 8 vectors of columns: the row sums stay in
// registers while the kh rows stream past (a store/load round trip per row would bound small
// planes). `weighted` takes whole vectors (it has room for the overhang).
template <typename T>
void window_row(const T* rows, const acc_t<T>* ah, const acc_t<T>* aw, acc_t<T>* weighted, int64_t W, int64_t wc,
                int64_t kh) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  for_runs<A>(wc, [&](auto run) {
    constexpr int NV = decltype(run)::size;
    const int64_t w0 = run.w0;
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V(0);
    for (int64_t r = 0; r < kh; ++r) {
      const V a_h(ah[r]);
      const T* row = rows + r * W + w0;
      for (int v = 0; v < NV; ++v) acc[v] = at::vec::fmadd(load(row + v * L, run.lanes(v)), a_h, acc[v]);
    }
    for (int v = 0; v < NV; ++v) (acc[v] * load(aw + w0 + v * L, run.lanes(v))).store(weighted + w0 + v * L);
  });
}

#if defined(CPU_CAPABILITY_AVX512)
// Window sums of a window row of <= 64 columns (four vectors) into 3 to 16 windows: lane j of the
// result is sum_{t < kw} row[j * kw + t]. Per tap, two two-source permutes fetch column j*kw + t
// from either half of the row and a blend on bit 5 of the index picks the half: four instructions
// a tap for all windows, where the scalar loop takes two per column (so it stays for 1-2 windows).
struct WindowSums {
  std::vector<__m512i> idx;
  std::vector<__mmask16> high;
  __mmask16 out;
  WindowSums(int64_t kw, int64_t wo) : out(lanes(wo)) {
    for (int64_t t = 0; t < kw; ++t) {
      const __m512i i = _mm512_maskz_add_epi32(out, _mm512_mullo_epi32(lane_ids(), _mm512_set1_epi32(int(kw))),
                                               _mm512_set1_epi32(int(t)));
      idx.push_back(i);
      high.push_back(_mm512_cmpge_epi32_mask(i, _mm512_set1_epi32(32)));
    }
  }
  static bool fits(int64_t wc, int64_t wo) { return wc <= 64 && wo >= 3 && wo <= 16; }
  void operator()(const float* row, float* y, float scale) const {
    const __m512 r0 = _mm512_loadu_ps(row), r1 = _mm512_loadu_ps(row + 16), r2 = _mm512_loadu_ps(row + 32),
                 r3 = _mm512_loadu_ps(row + 48);
    __m512 s = _mm512_setzero_ps();
    for (size_t t = 0; t < idx.size(); ++t)
      s = _mm512_add_ps(s, _mm512_mask_blend_ps(high[t], _mm512_permutex2var_ps(r0, idx[t], r1),
                                                _mm512_permutex2var_ps(r2, idx[t], r3)));
    _mm512_mask_storeu_ps(y, out, _mm512_mul_ps(s, _mm512_set1_ps(scale)));
  }
};
#endif

template <typename T>
void gated_pool_nchw(const T* x, const acc_t<T>* ah, const acc_t<T>* aw, acc_t<T>* y, int64_t planes, int64_t H,
                     int64_t W, int64_t kh, int64_t kw) {
  using A = acc_t<T>;
  constexpr int64_t L = Vectorized<A>::size();
  const int64_t ho = H / kh, wo = W / kw, wc = wo * kw;  // wc: columns covered by windows
  const A inv = A(1) / A(kh * kw);
  at::parallel_for(0, planes, grain(H * W), [&](int64_t begin, int64_t end) {
    std::vector<A> weighted(std::max<int64_t>(wc + L, 64));  // the window row's column sums times a_w
#if defined(CPU_CAPABILITY_AVX512)
    std::optional<WindowSums> sums;
    if constexpr (std::is_same_v<A, float>)
      if (WindowSums::fits(wc, wo)) sums.emplace(kw, wo);
#endif
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t i = 0; i < ho; ++i) {
        const T* rows = x + (p * H + i * kh) * W;
        const A* a_h = ah + p * H + i * kh;
        window_row(rows, a_h, aw + p * W, weighted.data(), W, wc, kh);
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<A, float>)
          if (sums) {
            (*sums)(weighted.data(), y + (p * ho + i) * wo, inv);
            continue;
          }
#endif
        window_sums(weighted.data(), y + (p * ho + i) * wo, kw, wo, inv);
      }
    }
  });
}

template <typename T>
void gated_pool_nhwc(const T* x, const acc_t<T>* ah, const acc_t<T>* aw, acc_t<T>* y, int64_t B, int64_t C, int64_t H,
                     int64_t W, int64_t kh, int64_t kw) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t ho = H / kh, wo = W / kw, wc = wo * kw;
  const int64_t cb = std::min(C, kChannelBlock), nblk = (C + cb - 1) / cb;
  const A inv = A(1) / A(kh * kw);
  at::parallel_for(0, B * nblk, grain(H * W * cb), [&](int64_t begin, int64_t end) {
    // Gates transposed to [position][channel] so the inner loop runs along C like X.
    std::vector<A> ah_t(H * cb), aw_t(wc * cb), acc(wo * cb);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nblk, c0 = t % nblk * cb, cn = std::min(cb, C - c0);
      for (int64_t c = 0; c < cn; ++c) {
        for (int64_t h = 0; h < H; ++h) ah_t[h * cb + c] = ah[(b * C + c0 + c) * H + h];
        for (int64_t w = 0; w < wc; ++w) aw_t[w * cb + c] = aw[(b * C + c0 + c) * W + w];
      }
      for (int64_t i = 0; i < ho; ++i) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t h = i * kh; h < (i + 1) * kh; ++h)
          for (int64_t w = 0; w < wc; ++w) {
            const T* px = x + ((b * H + h) * W + w) * C + c0;
            A* aj = acc.data() + w / kw * cb;
            for_lanes<A>(cn, [&](int64_t c, int64_t n) {
              auto g = load(ah_t.data() + h * cb + c, n) * load(aw_t.data() + w * cb + c, n);
              store(aj + c, load(aj + c, n) + load(px + c, n) * g, n);
            });
          }
        for (int64_t c = 0; c < cn; ++c)
          for (int64_t j = 0; j < wo; ++j) y[((b * C + c0 + c) * ho + i) * wo + j] = acc[j * cb + c] * inv;
      }
    }
  });
}

}  // namespace

void gated_pool(Forward& f, const Part& part) {
  const int64_t C = f.C, H = f.H, W = f.W, kh = f.kh, kw = f.kw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.x.scalar_type(), "scsa_gated_pool", [&] {
    using A = acc_t<scalar_t>;
    const int64_t p0 = part.first_plane(C, f.channels_last);
    const scalar_t* x = f.x.const_data_ptr<scalar_t>() + p0 * H * W;
    const A* ah = f.ah.const_data_ptr<A>() + p0 * H;
    const A* aw = f.aw.const_data_ptr<A>() + p0 * W;
    A* y = f.y.data_ptr<A>() + p0 * (H / kh) * (W / kw);
    if (f.channels_last)
      gated_pool_nhwc(x, ah, aw, y, part.nb, C, H, W, kh, kw);
    else
      gated_pool_nchw(x, ah, aw, y, part.planes(C), H, W, kh, kw);
  });
}

}  // namespace scsa
