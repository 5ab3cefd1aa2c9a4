// The CPU backward (DESIGN.md section 3), one op call: the first full-size pass (gate_grads), the
// small graphs per sample (channel attention, then both spatial gates, differentiated by hand in
// channel_attention_backward.cpp and spatial_gate_backward.cpp), the second full-size pass
// (input_grad), sample-major like the forward; then the parameter gradients: per-sample partials
// summed over the batch in order, so they are bitwise the same for any number of threads.
#include "scsa.h"

namespace scsa {
namespace {

// Sample b: dL/da_c from the first pass's sums, the channel attention's backward, then dL/da_h and
// dL/da_w (the direct part a_c * sum, plus the pooled part through dL/dY) into the spatial gates'.
// Vector loops along the rows; the windows are walked as (window, offset) pairs, not found by
// dividing an index by the window size inside the loops.
template <typename A>
void sample_backward(Backward& bw, int64_t b) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t C = bw.C, H = bw.H, W = bw.W, kh = bw.kh, kw = bw.kw;
  const int64_t ho = H / kh, wo = W / kw, hc = (H + kh - 1) / kh, wc = wo * kw;
  const A* r = bw.r.const_data_ptr<A>() + b * C * H;
  const A* s = bw.s.const_data_ptr<A>() + b * C * hc * W;
  const A* u = bw.u.const_data_ptr<A>() + b * C * ho * kh * wo;
  const A* v = bw.v.const_data_ptr<A>() + b * C * ho * wo * kw;
  const A* ah = bw.ah.const_data_ptr<A>() + b * C * H;
  std::vector<A> dA(C), ac(C), dah(C * H), daw(C * W);
  for (int64_t c = 0; c < C; ++c) {
    V sum(0);
    for_lanes<A>(
        H, [&](int64_t h, int64_t n) { sum = at::vec::fmadd(load(ah + c * H + h, n), load(r + c * H + h, n), sum); });
    dA[c] = reduce_sum(sum);
  }
  channel_attention_backward<A>(bw, b, dA.data(), ac.data());
  const A* dy = bw.dy.const_data_ptr<A>() + b * C * ho * wo;
  std::vector<A> up(W + L), pooled(W + L);  // a window row of dY spread over its columns; daw's pooled part
  for (int64_t c = 0; c < C; ++c) {
    const A* dyc = dy + c * ho * wo;
    const V a_c(ac[c]);
    // dah: the pooled part of row h is the dot of u's row h with its window row of dY.
    RowSums<A> rows{dah.data() + c * H, false};
    for (int64_t i = 0; i < ho; ++i)
      for (int64_t h = i * kh; h < (i + 1) * kh; ++h) {
        V dot(0);
        for_lanes<A>(wo, [&](int64_t j, int64_t n) {
          dot = at::vec::fmadd(load(u + (c * ho * kh + h) * wo + j, n), load(dyc + i * wo + j, n), dot);
        });
        rows.push(dot);
      }
    rows.flush();
    std::fill(dah.begin() + c * H + ho * kh, dah.begin() + (c + 1) * H, A(0));  // rows no window covers
    for_lanes<A>(H, [&](int64_t h, int64_t n) {
      store(dah.data() + c * H + h, at::vec::fmadd(a_c, load(r + c * H + h, n), load(dah.data() + c * H + h, n)), n);
    });
    // daw: the direct part sums s over the window rows; the pooled part weights v's window rows by
    // dY spread over each window's columns.
    std::fill(pooled.begin(), pooled.end(), A(0));
    for (int64_t i = 0; i < ho; ++i) {
      for (int64_t j = 0; j < wo; ++j) std::fill(up.begin() + j * kw, up.begin() + (j + 1) * kw, dyc[i * wo + j]);
      for_lanes<A>(wc, [&](int64_t w, int64_t n) {
        at::vec::fmadd(load(v + (c * ho + i) * wc + w, n), V::loadu(up.data() + w), V::loadu(pooled.data() + w))
            .store(pooled.data() + w);
      });
    }
    for_lanes<A>(W, [&](int64_t w, int64_t n) {
      V direct(0);
      for (int64_t i = 0; i < hc; ++i) direct += load(s + (c * hc + i) * W + w, n);
      store(daw.data() + c * W + w, at::vec::fmadd(a_c, direct, V::loadu(pooled.data() + w)), n);
    });
  }
  spatial_gate_backward<A>(bw, b, false, dah.data());
  spatial_gate_backward<A>(bw, b, true, daw.data());
}

// Offsets of each gradient in a row of partials (Backward::at), and the row's length.
int64_t layout(Backward& bw) {
  const int64_t C = bw.C, G = C / 4;
  std::vector<int64_t> sizes;
  for (int64_t k : bw.kernel_sizes) sizes.push_back(G * k);
  for (int i = 0; i < 4; ++i) sizes.push_back(G);
  for (int i = 0; i < (bw.q_bias.defined() ? 12 : 9); ++i) sizes.push_back(C);  // 3 norms x 2, q/k/v (+ biases)
  int64_t total = 0;
  for (int64_t n : sizes) bw.at.push_back(total), total += n;
  bw.at.push_back(total);
  return total;
}

// The gradients, flat in the op's output order: the partials (B, P) summed over samples in order,
// so the result does not depend on the threads.
Tensor sum_partials(const Tensor& partials) {
  const int64_t B = partials.size(0), P = partials.size(1);
  Tensor grads = alloc({P}, partials.options());
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "scsa_sum_partials", [&] {
    const scalar_t* part = partials.const_data_ptr<scalar_t>();
    scalar_t* sum = grads.data_ptr<scalar_t>();
    at::parallel_for(0, P, grain(B), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        scalar_t t = 0;
        for (int64_t b = 0; b < B; ++b) t += part[b * P + k];
        sum[k] = t;
      }
    });
  });
  return grads;
}

}  // namespace

std::vector<Tensor> backward(const Tensor& g, const Tensor& x, at::TensorList conv_weights, at::TensorList conv_biases,
                             const Tensor& norm_h_weight, const Tensor& norm_h_bias, const Tensor& norm_w_weight,
                             const Tensor& norm_w_bias, const Tensor& norm_c_weight, const Tensor& norm_c_bias,
                             const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                             const std::optional<Tensor>& q_bias, const std::optional<Tensor>& k_bias,
                             const std::optional<Tensor>& v_bias, const Tensor& ph, const Tensor& pw, const Tensor& ah,
                             const Tensor& aw, const Tensor& y, const Tensor& o, int64_t head_num, int64_t kh,
                             int64_t kw, bool softmax, double eps, bool input_grad) {
  check_x(x, "x");
  check_window(x, kh, kw);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), ho = H / kh, wo = W / kw;
  TORCH_CHECK(head_num >= 1 && C % head_num == 0, "scsa_cpp: head_num ", head_num, " must divide C = ", C);
  const auto acc = acc_dtype(x.scalar_type());
  Backward bw;
  static_cast<Weights&>(bw) =
      load_weights(C, acc, conv_weights, conv_biases, norm_h_weight, norm_h_bias, norm_w_weight, norm_w_bias,
                   norm_c_weight, norm_c_bias, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias);
  bw.dtype = x.scalar_type(), bw.B = B, bw.C = C, bw.H = H, bw.W = W, bw.kh = kh, bw.kw = kw, bw.head_num = head_num,
  bw.softmax = softmax;
  bw.eps = eps;
  bw.ph = check_small(ph, "p_h", {B, C, H}, acc), bw.pw = check_small(pw, "p_w", {1, B, C, W}, acc);
  bw.ah = check_small(ah, "a_h", {B, C, H}, acc), bw.aw = check_small(aw, "a_w", {B, C, W}, acc);
  bw.y = check_small(y, "Y", {B, C, ho, wo}, acc).view({B, C, ho * wo});
  bw.o = check_small(o, "o", {B, C}, acc);
  auto [xd, channels_last] = dense(x);
  const auto opts = bw.ah.options();
  Tensor dx = input_grad ? alloc(xd.sizes(), xd.options().memory_format(format_of(channels_last)))
                         : at::empty({0}, x.options());
  if (!parameters_finite(bw)) {
    // A parameter holds NaN or Inf (a diverged model): every gradient NaN, so that no finite number
    // stands where the eager module's backward has a NaN or Inf (which elements those are depends
    // on how each eager op is written) and a GradScaler skips the step. Decided here, in the op,
    // rather than by a host read of the parameters before the call.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {dx.fill_(nan), alloc({layout(bw)}, opts).fill_(nan)};
  }
  const Tensor gd = upstream(g, xd, channels_last);
  std::tie(bw.r, bw.s, bw.u, bw.v) = gate_grad_sums(B, C, H, W, kh, kw, opts);
  bw.dy = alloc({B, C, ho, wo}, opts);
  bw.dph = alloc({B, C, H}, opts), bw.dpw = alloc({B, C, W}, opts);
  bw.partials = at::zeros({B, layout(bw)}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "scsa_backward", [&] {
    auto run = [&](int64_t b0, int64_t nb) {
      gate_grads_samples(gd, xd, channels_last, bw.ah, bw.aw, bw.r, bw.s, bw.u, bw.v, kh, kw, b0, nb);
      at::parallel_for(b0, b0 + nb, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) sample_backward<scalar_t>(bw, b);
      });
      if (input_grad)
        input_grad_samples(gd, dx, channels_last, bw.ah, bw.aw, bw.o, bw.dy, bw.dph, bw.dpw, kh, kw, softmax, b0, nb);
    };
    // As the forward: with enough samples per thread, one task takes a sample through both
    // full-size passes and its small graphs while its g and X sit in that core's L2; small batches
    // run pass by pass with each pass parallel inside (nested parallel_for calls run inline).
    if (B >= 2 * at::get_num_threads())
      for_each_sample(B, [&](int64_t b) { run(b, 1); });
    else
      run(0, B);
  });
  Tensor grads = sum_partials(bw.partials);
  std::vector<Tensor> out{dx, grads};
  return out;
}

}  // namespace scsa
