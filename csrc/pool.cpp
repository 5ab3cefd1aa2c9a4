// F1 of DESIGN.md: row sums p_h (B, C, H) and column sums p_w (1, B, C, W) of X in one read.
// The leading 1 keeps the Triton provider's banded layout (here a single band), so the spatial
// gate and the autograd Function see the same shapes from either provider.
#include "scsa.h"

namespace scsa {
namespace {

// Runs of up to 8 vectors of columns of one plane: the column sums stay in registers while the
// rows stream past; the row sums are reduced four rows at a time.
template <typename T>
void plane_sums(const T* plane, acc_t<T>* ph, acc_t<T>* pw, int64_t H, int64_t W) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  for_runs<A>(W, [&](auto run) {
    constexpr int NV = decltype(run)::size;
    const int64_t w0 = run.w0;
    V col[NV];
    for (int v = 0; v < NV; ++v) col[v] = V(0);
    auto sum_of_row = [&](int64_t h) {
      const T* row = plane + h * W + w0;
      prefetch_ahead(row, NV * L * int64_t(sizeof(T)));
      V sum(0);
      for (int v = 0; v < NV; ++v) {
        const auto x = load(row + v * L, run.lanes(v));
        col[v] += x;
        sum += x;
      }
      return sum;
    };
    const bool accumulate = w0 > 0;
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) {
      const V rows[4] = {sum_of_row(h), sum_of_row(h + 1), sum_of_row(h + 2), sum_of_row(h + 3)};
      row_sums4(rows, ph + h, accumulate);
    }
    for (; h < H; ++h) row_sum(sum_of_row(h), ph + h, accumulate);
    for (int v = 0; v < NV; ++v) store(pw + w0 + v * L, col[v], run.lanes(v));
  });
}

template <typename T>
void pool_nchw(const T* x, acc_t<T>* ph, acc_t<T>* pw, int64_t planes, int64_t H, int64_t W) {
  at::parallel_for(0, planes, grain(H * W), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) plane_sums(x + p * H * W, ph + p * H, pw + p * W, H, W);
  });
}

template <typename T>
void pool_nhwc(const T* x, acc_t<T>* ph, acc_t<T>* pw, int64_t B, int64_t C, int64_t H, int64_t W) {
  using A = acc_t<T>;
  const int64_t cb = std::min(C, kChannelBlock), nblk = (C + cb - 1) / cb;
  at::parallel_for(0, B * nblk, grain(H * W * cb), [&](int64_t begin, int64_t end) {
    std::vector<A> row(cb), col(W * cb);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nblk, c0 = t % nblk * cb, cn = std::min(cb, C - c0);
      std::fill(col.begin(), col.end(), A(0));
      for (int64_t h = 0; h < H; ++h) {
        std::fill(row.begin(), row.end(), A(0));
        for (int64_t w = 0; w < W; ++w) {
          const T* px = x + ((b * H + h) * W + w) * C + c0;
          A* cw = col.data() + w * cb;
          for_lanes<A>(cn, [&](int64_t c, int64_t n) {
            auto v = load(px + c, n);
            store(row.data() + c, load(row.data() + c, n) + v, n);
            store(cw + c, load(cw + c, n) + v, n);
          });
        }
        for (int64_t c = 0; c < cn; ++c) ph[(b * C + c0 + c) * H + h] = row[c];
      }
      for (int64_t c = 0; c < cn; ++c)
        for (int64_t w = 0; w < W; ++w) pw[(b * C + c0 + c) * W + w] = col[w * cb + c];
    }
  });
}

}  // namespace

void pool(Forward& f, const Part& part) {
  const int64_t C = f.C, H = f.H, W = f.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.x.scalar_type(), "scsa_pool", [&] {
    using A = acc_t<scalar_t>;
    const int64_t p0 = part.first_plane(C, f.channels_last);
    const scalar_t* x = f.x.const_data_ptr<scalar_t>() + p0 * H * W;
    A* ph = f.ph.data_ptr<A>() + p0 * H;
    A* pw = f.pw.data_ptr<A>() + p0 * W;
    if (f.channels_last)
      pool_nhwc(x, ph, pw, part.nb, C, H, W);
    else
      pool_nchw(x, ph, pw, part.planes(C), H, W);
  });
}

}  // namespace scsa
