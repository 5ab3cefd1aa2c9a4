// Shared pieces of the fused SCSA CPU path (DESIGN.md sections 2-3): input checks, the two
// supported memory layouts, and at::vec load/store helpers that widen bf16/fp16 to fp32 lanes.
// Every pass accumulates in at::opmath_type (fp32, or fp64 for fp64 inputs); the small outputs
// (pooled sums, gates, Y, logits, backward partial sums) are in that accumulator dtype.
#pragma once

#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace scsa {

using at::Tensor;
using at::vec::Vectorized;

template <typename T>
using acc_t = at::opmath_type<T>;
template <typename T>
using AccVec = Vectorized<acc_t<T>>;

// Masks and lane indices for partial vectors of 16 lanes.
#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
inline __m512i lane_ids() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
#elif defined(CPU_CAPABILITY_AVX2)
// AVX2 masks for vmaskmov loads: the first n lanes of 8 (fp32) or 4 (fp64) have their sign bit set.
inline __m256i lanes32(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i lanes64(int64_t n) { return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)); }
#endif

// n < size() lanes of an accumulator-dtype vector at p, the rest zero. at::vec's own partial load
// on AVX2 goes through a stack buffer and a memcpy call; vmaskmov reads the n lanes only. The rows
// of every NCHW map narrower than a vector, and the tail of every other, take this path. (Partial
// stores stay at::vec's: a vmaskmov store is slow on AMD's cores, +14% at 7x7 maps on Zen 4.)
template <typename A>
inline Vectorized<A> load_partial(const A* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>)
    return _mm256_maskload_ps(p, lanes32(n));
  else
    return _mm256_maskload_pd(p, lanes64(n));
#else
  return Vectorized<A>::loadu(p, n);
#endif
}

// n <= size() elements of p, widened to accumulator lanes; lanes past n are zero.
template <typename T>
inline AccVec<T> load(const T* p, int64_t n) {
  using A = acc_t<T>;
  constexpr int64_t L = AccVec<T>::size();
  if constexpr (std::is_same_v<T, A>) {
    return n == L ? AccVec<T>::loadu(p) : load_partial(p, n);
  } else {
    if (n == L) {
      Vectorized<float> v;
      at::vec::load_to_float(p, v);
      return v;
    }
    // Partial vector (every row of an NCHW map narrower than a vector, or its tail).
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i raw = _mm256_maskz_loadu_epi16(lanes(n), p);
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return Vectorized<float>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
    else
      return Vectorized<float>(_mm512_cvtph_ps(raw));
#elif defined(CPU_CAPABILITY_AVX2)
    // No 16-bit masked load: the n / 2 whole pairs by a 32-bit vmaskmov, and element n - 1 (the
    // odd one out, or again the last of a pair) broadcast and blended into its lane.
    if (n == 0) return Vectorized<float>(0.f);
    const auto* bits = reinterpret_cast<const int16_t*>(p);
    const __m128i lane_ids16 = _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7);
    const __m128i pairs = _mm_cmpgt_epi32(_mm_set1_epi32(int(n / 2)), _mm_setr_epi32(0, 1, 2, 3));
    const __m128i raw =
        _mm_blendv_epi8(_mm_maskload_epi32(reinterpret_cast<const int*>(bits), pairs), _mm_set1_epi16(bits[n - 1]),
                        _mm_cmpeq_epi16(_mm_set1_epi16(int16_t(n - 1)), lane_ids16));
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return Vectorized<float>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
    else
      return Vectorized<float>(_mm256_cvtph_ps(raw));
#else
    alignas(64) T buf[L] = {};
    std::memcpy(buf, p, n * sizeof(T));
    Vectorized<float> v;
    at::vec::load_to_float(buf, v);
    return v;
#endif
  }
}

template <typename T>
inline void store(T* p, const AccVec<T>& v, int64_t n) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<T, A>) {
    v.store(p, n);
  } else {
    // Rounded as a whole vector; the low half of the narrow vector holds v's lanes.
    constexpr int64_t L = AccVec<T>::size();
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i low = _mm512_castsi512_si256(at::vec::convert_from_float<T>(v, v));
    _mm256_mask_storeu_epi16(p, lanes(n), low);
#elif defined(CPU_CAPABILITY_AVX2)
    // No 16-bit masked store (and vmaskmov stores are slow on AMD's cores): 4, 2 and 1 values by
    // plain stores of the low bytes, as n's bits say.
    __m128i low = _mm256_castsi256_si128(at::vec::convert_from_float<T>(v, v));
    if (n == L) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), low);
      return;
    }
    auto* out = reinterpret_cast<char*>(p);
    if (n & 4) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), low);
      low = _mm_srli_si128(low, 8), out += 8;
    }
    if (n & 2) {
      const int32_t pair = _mm_cvtsi128_si32(low);
      std::memcpy(out, &pair, 4);
      low = _mm_srli_si128(low, 4), out += 4;
    }
    if (n & 1) {
      const int16_t one = int16_t(_mm_cvtsi128_si32(low));
      std::memcpy(out, &one, 2);
    }
#else
    alignas(64) T buf[Vectorized<T>::size()];
    at::vec::convert_from_float<T>(v, v).store(buf);
    if (n == L)
      std::memcpy(p, buf, L * sizeof(T));  // a fixed size: one vector move
    else
      std::memcpy(p, buf, n * sizeof(T));
#endif
  }
}

// Lane reductions. at::vec's vec_reduce_all has SIMD shuffles for fp32 on AVX2 and AVX512 only;
// its fallback (fp64, and DEFAULT) rebuilds a vector from each lane through the stack, a scalar
// store that a vector load cannot forward from (~20 cycles a lane on Zen 4: with 8 heads, half the
// 7x7 channel attention's time, in its fp64 power series). Ours stores once and reads the lanes
// back, in the fallback's order.
template <typename A, typename VecOp, typename ScalarOp>
inline A reduce_lanes(const Vectorized<A>& v, const VecOp& vec_op, const ScalarOp& scalar_op) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr bool shuffles = std::is_same_v<A, float>;
#else
  constexpr bool shuffles = false;
#endif
  if constexpr (shuffles) {
    return at::vec::vec_reduce_all<A>(vec_op, v);
  } else {
    alignas(64) A lane[Vectorized<A>::size()];
    v.store(lane);
    A r = lane[0];
    for (int64_t i = 1; i < Vectorized<A>::size(); ++i) r = scalar_op(r, lane[i]);
    return r;
  }
}

template <typename A>
inline A reduce_sum(const Vectorized<A>& v) {
  return reduce_lanes(v, [](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, [](A a, A b) { return a + b; });
}

// *out (+)= the sum of row's lanes: one row at a time, where row_sums4 takes four.
template <typename A>
inline void row_sum(const Vectorized<A>& row, A* out, bool accumulate) {
  *out = (accumulate ? *out : A(0)) + reduce_sum(row);
}

// out[r] (+)= the sum of rows[r]'s lanes, r < 4. One reduction per row is a chain of shuffles
// and adds that a row loop waits on; four rows share one transpose-and-add tree (fp32 on AVX2 and
// AVX512: 4 hadds, 1 extract, 1 add; AVX512 first folds each row to 8 lanes).
template <typename A>
C10_ALWAYS_INLINE void row_sums4(const Vectorized<A> (&rows)[4], A* out, bool accumulate) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    __m256 r[4];
    for (int i = 0; i < 4; ++i) {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 v = rows[i];
      r[i] = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
#else
      r[i] = rows[i];
#endif
    }
    // [r0 r1 r2 r3 (lanes 0-3 summed) | r0 r1 r2 r3 (lanes 4-7 summed)]
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    if (accumulate) s = _mm_add_ps(_mm_loadu_ps(out), s);
    _mm_storeu_ps(out, s);
    return;
  }
#endif
  for (int i = 0; i < 4; ++i) row_sum(rows[i], out + i, accumulate);
}

// y[j] = scale * sum_{t < kw} row[j * kw + t] for j < wo; row must be readable to (wo - 1) * kw +
// one vector. fp32 windows of at most one vector: window j is the vector loaded at its first
// column with the lanes past kw cleared, and row_sums4 sums four such windows in one
// transpose-and-add tree (~8 instructions a window where the scalar loop takes ~2 a column). (One
// vgatherdps of 8 windows' columns a tap took a tenth of the scalar loop's instructions and was
// slower on Zen 4, by 10-20% of the whole forward at 28x28 and 56x56 maps.)
template <typename A>
inline void window_sums(const A* row, A* y, int64_t kw, int64_t wo, A scale) {
  using V = Vectorized<A>;
  if constexpr (std::is_same_v<A, float>) {
    if (kw <= V::size() && wo >= 4) {  // (fewer windows cost the tree more than the loop)
      const V keep = V::set(V(0), V(0) == V(0), kw);
      for (int64_t j = 0; j < wo; j += 4) {
        const int64_t n = std::min<int64_t>(4, wo - j);
        V windows[4];
        for (int64_t r = 0; r < 4; ++r) windows[r] = r < n ? V::loadu(row + (j + r) * kw) & keep : V(0);
        alignas(16) A sums[4];
        row_sums4(windows, sums, false);
        for (int64_t r = 0; r < n; ++r) y[j + r] = sums[r] * scale;
      }
      return;
    }
  }
  for (int64_t j = 0; j < wo; ++j) {
    A s = 0;
    for (int64_t t = j * kw; t < (j + 1) * kw; ++t) s += row[t];
    y[j] = s * scale;
  }
}

// Row sums of a run of consecutive rows: push each row's vector in order; out[i] (+)= the sum of
// the i-th row's lanes, four rows to a row_sums4, the last 0-3 on flush().
template <typename A>
struct RowSums {
  A* out;
  bool accumulate;
  Vectorized<A> rows[4];
  int n = 0;
  // always inlined: as an outlined call per row it cost more than the reductions it saves
  C10_ALWAYS_INLINE void push(const Vectorized<A>& row) {
    rows[n++] = row;
    if (n == 4) row_sums4(rows, out, accumulate), out += 4, n = 0;
  }
  void flush() {
    for (int i = 0; i < n; ++i) row_sum(rows[i], out + i, accumulate);
    out += n, n = 0;
  }
};

template <typename A>
inline A reduce_max(const Vectorized<A>& v) {
  // NaN in either propagates, as at::vec::maximum does.
  return reduce_lanes(
      v, [](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::maximum(a, b); },
      [](A a, A b) { return a != a ? a : (b != b ? b : std::max(a, b)); });
}

// Scores and logits are kept in log2 units (x * log2(e)) so that exponentials are exp2.
constexpr double kLog2e = 1.44269504088896340736, kLn2 = 0.693147180559945309417;
// The score of a padding lane and the start of a running max: exp2 turns it into exactly 0, and,
// unlike -inf, subtracting it from itself is 0, not NaN.
constexpr double kPadScore = -1e30;

// 2^f for |f| <= 1/2: the degree-6 minimax polynomial, in fp32 Horner steps.
inline Vectorized<float> exp2_fraction(const Vectorized<float>& f) {
  using V = Vectorized<float>;
  V p = at::vec::fmadd(V(1.534581242594868e-4f), f, V(1.3399930903688073e-3f));
  for (const float c :
       {9.618489071726799e-3f, 5.550328642129898e-2f, 2.4022646248340607e-1f, 6.931471824645996e-1f, 1.f})
    p = at::vec::fmadd(p, f, V(c));
  return p;
}

// 2^x, for the softmax terms whose count dominates a pass. On AVX512 fp32 it is round, a degree-6
// polynomial of the fraction (a minimax fit: within 0.94 ulp with fp32 Horner steps) and
// vscalefps: 9 instructions where exp_u20 takes ~19 (its clamps and integer exponent assembly);
// on AVX2 fp32 the same polynomial times 2^n assembled in the exponent field (14).
// Very negative x (kPadScore, -inf) gives 0, +inf gives inf and NaN stays
// NaN on every instruction set (at::vec's exp_u20 turns NaN into inf, so a NaN logit would
// become a gate of 0 or 1: the NaN is put back).
template <typename A>
inline Vectorized<A> exp2(const Vectorized<A>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_fraction(_mm512_sub_ps(x, n)), n);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // AVX2 has no vscalefps: 2^n is built in the exponent field from n clamped to [-127, 128]: -127
  // gives the field 0 (x < -126.5 flushes to 0, kPadScore and -inf included), 128 gives inf (+inf
  // stays inf). vmaxps / vminps return their second operand when either is NaN, so with x second
  // a NaN passes both clamps and the fraction, and the product is NaN whatever the exponent bits
  // (a blend putting it back was 2 of the loop's 18 instructions).
  if constexpr (std::is_same_v<A, float>) {
    const __m256 c = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), x));
    const __m256 n = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(exp2_fraction(_mm256_sub_ps(c, n)), _mm256_castsi256_ps(e));
  }
#endif
  const Vectorized<A> e = (x * Vectorized<A>(A(kLn2))).exp_u20();
  return Vectorized<A>::blendv(e, x, x.isnan());
}

// The sum of (x - mu)^2 over `rows` rows of `len` values, `ld` apart, squared and summed in fp64:
// the backward's GroupNorm variances, and the forward's where fp32 overflowed.
template <typename A>
double squared_deviations(const A* x, int64_t rows, int64_t len, int64_t ld, A mu) {
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < len; ++i) sum += double(x[r * ld + i] - mu) * double(x[r * ld + i] - mu);
  return sum;
}

// The backward's GroupNorm statistics (mean, rstd) of `n` contiguous values, both passes summed in
// fp64.
template <typename A>
std::pair<A, A> fp64_mean_rstd(const A* x, int64_t n, double eps) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const A mu = A(sum / n);
  return {mu, A(1 / std::sqrt(squared_deviations(x, 1, n, n, mu) / n + eps))};
}

// A GroupNorm variance whose fp32 sum of squares overflowed: finite values whose deviations pass
// sqrt(FLT_MAX) / sqrt(count) (~1e19) have a finite variance, which fp32 squares turn into inf and
// a gate of rstd = 0, a wrong number with no NaN to show it. The sum redone in fp64 (as the
// backward always sums it, squared_deviations) where it is finite; otherwise (a NaN or Inf among
// x) `fp32_sum`, so non-finite inputs propagate as before.
template <typename A>
double overflow_safe_sum_sq(double fp32_sum, const A* x, int64_t rows, int64_t len, int64_t ld, A mu) {
  if (std::isfinite(fp32_sum) || !std::is_same_v<A, float>) return fp32_sum;
  const double sum = squared_deviations(x, rows, len, ld, mu);
  return std::isfinite(sum) ? sum : fp32_sum;
}

// Calls f(i, n) for i = 0, L, 2L, ... < len with n lanes in that step.
template <typename A, typename F>
inline void for_lanes(int64_t len, const F& f) {
  constexpr int64_t L = Vectorized<A>::size();
  for (int64_t i = 0; i < len; i += L) f(i, std::min(L, len - i));
}

// Each channel's row of `src` (G x L, the accumulator dtype) between `pad` zeros on both sides,
// rows Lp = L + 2 pad apart, plus slack: a conv over it reads whole vectors from any tap with no
// bounds checks. Rows are written as whole vectors in channel order (a partial store goes through
// a buffer and a memcpy call): a row's overhang, zeros, lands on later rows, written after it.
template <typename A>
std::vector<A> padded_rows(const A* src, int64_t G, int64_t L, int64_t pad) {
  constexpr int64_t Lanes = Vectorized<A>::size();
  const int64_t Lp = L + 2 * pad, Lv = (L + Lanes - 1) / Lanes * Lanes;
  std::vector<A> out(G * Lp + Lv + Lanes, A(0));
  for (int64_t c = 0; c < G; ++c)
    for_lanes<A>(L, [&](int64_t l, int64_t n) { load(src + c * L + l, n).store(out.data() + c * Lp + pad + l); });
  return out;
}

// Column runs for loops that keep one accumulator a vector in registers: calls
// f(std::integral_constant<int, NF>, std::bool_constant<TAIL>, w0) for runs of NF whole vectors
// from column w0 (at most 8), the last run with TAIL: one more, partial vector of len % L lanes.
// The counts are compile-time, so the hot loops carry no per-vector checks (a runtime count cost
// two tests and two taken jumps a vector).
template <typename A, int NF = 0, typename F>
inline void run_of(int64_t full, bool tail, int64_t w0, const F& f) {
  if constexpr (NF < 8)
    if (full != NF) return run_of<A, NF + 1>(full, tail, w0, f);
  if (tail)
    f(std::integral_constant<int, NF>{}, std::true_type{}, w0);
  else if constexpr (NF > 0)  // (no run is empty)
    f(std::integral_constant<int, NF>{}, std::false_type{}, w0);
}

template <typename A, typename F>
inline void for_runs(int64_t len, const F& f) {
  constexpr int64_t L = Vectorized<A>::size();
  int64_t w0 = 0;
  for (; len - w0 >= 9 * L; w0 += 8 * L) f(std::integral_constant<int, 8>{}, std::false_type{}, w0);
  if (len > w0) run_of<A>((len - w0) / L, (len - w0) % L != 0, w0, f);
}

// How far ahead of a full-size NCHW stream its software prefetch reaches. Two streams come from
// memory, not L2: the pool's read of X (a sample's first touch) and apply_gates' write of out or
// dX (each line read for ownership first), whose loops perf showed stalled on those accesses.
// Prefetching 8 KiB ahead took 5-7% (fp32) and 3-7% (bf16) off the forward at every ResNet-50
// shape, caches flushed before each call (AMD EPYC, AVX2; 2 KiB did about as well, 16-32 KiB no better;
// the backward within noise). A prefetch never faults, so
// addresses past the tensor's end are harmless (computed as integers: no out-of-bounds pointer).
constexpr int64_t kPrefetchBytes = 8192;

// Prefetches the `bytes` starting kPrefetchBytes past p, to read (or to write: kWrite).
template <bool kWrite = false>
inline void prefetch_ahead(const void* p, int64_t bytes) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + kPrefetchBytes;
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + k), kWrite, 3);
}

// Vector registers of the instruction set, for loops that size their accumulator blocks to fit.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// Channels per task in the channels_last passes: the vector loops run along C.
constexpr int64_t kChannelBlock = 64;
// Minimum elements of X per parallel task: below this, thread hand-off costs more than it saves.
constexpr int64_t kGrainElems = 16384;

inline int64_t grain(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// f(b) for every sample b < B. Each thread owns a contiguous block of samples, as a fixed split
// would give it (the same samples every call: a block that fits that core's L2 stays there), and
// when its block is done it takes what is left of the others', one sample at a time: a fixed split
// alone waits on its slowest thread, and a thread slowed by anything else on its core would hold
// up the whole call. A sample's result does not depend on which thread computes it.
template <typename F>
void for_each_sample(int64_t B, const F& f) {
  const int64_t T = at::get_num_threads(), per = (B + T - 1) / T;
  std::vector<std::atomic<int64_t>> next(T);  // next[t]: the next unclaimed sample of block t
  for (int64_t t = 0; t < T; ++t) next[t] = t * per;
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < T; ++k) {
        const int64_t u = (t + k) % T, stop = std::min(B, (u + 1) * per);
        for (int64_t b = next[u]++; b < stop; b = next[u]++) f(b);
      }
  });
}

// Every output of a pass. Tests set SCSA_OPS_POISON=1 so that outputs start as NaN and an element a
// pass forgets to write fails them instead of passing on whatever the allocator held.
inline Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static const bool poison = [] {
    const char* v = std::getenv("SCSA_OPS_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  Tensor t = at::empty(sizes, opts);
  return poison ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// X as one of the two layouts the passes handle. NCHW wins when a tensor is both (C == 1 or
// H == W == 1); other strides are copied to NCHW. The outputs of apply_gates / input_grad use the
// layout returned here (a Python fake implementation mirrors this rule).
inline std::pair<Tensor, bool> dense(const Tensor& x) {
  if (x.is_contiguous()) return {x, false};
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, true};
  return {x.contiguous(), false};
}

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The upstream gradient g of the backward passes, checked against the dense x and put in its layout.
inline Tensor upstream(const Tensor& g, const Tensor& x, bool channels_last) {
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "scsa_cpp: the upstream gradient must match x: got ", g.sizes(), " ", g.scalar_type(), " for x ",
              x.sizes(), " ", x.scalar_type());
  return g.contiguous(format_of(channels_last));
}

inline void check_x(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "scsa_cpp: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "scsa_cpp: ", name, " must be 4-D (B, C, H, W), got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, "scsa_cpp: ", name,
              " must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(x.size(1) % 4 == 0, "scsa_cpp: ", name, " must have a multiple of 4 channels, got ", x.size(1));
}

// A small tensor of the accumulator dtype with exactly `sizes` (any strides: made contiguous).
inline Tensor check_small(const Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType acc) {
  TORCH_CHECK(t.device().is_cpu(), "scsa_cpp: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == sizes, "scsa_cpp: ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "scsa_cpp: ", name, " must be ", acc, ", got ", t.scalar_type());
  return t.contiguous();
}

// A parameter of `numel` values in the accumulator dtype, contiguous (passes index it flat).
inline Tensor param(const Tensor& t, const char* name, int64_t numel, at::ScalarType acc) {
  TORCH_CHECK(t.device().is_cpu(), "scsa_cpp: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.numel() == numel, "scsa_cpp: ", name, " must have ", numel, " elements, got shape ", t.sizes());
  // Every call converts ~20 parameters: skip the dispatcher when there is nothing to do.
  if (t.scalar_type() == acc && t.is_contiguous()) return t;
  return t.to(acc).contiguous();
}

inline void check_window(const Tensor& x, int64_t kh, int64_t kw) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= x.size(2) && kw <= x.size(3), "scsa_cpp: pooling window (", kh, ", ", kw,
              ") must be >= 1 and fit the map ", x.sizes());
}

// Channel gate a_c (B, C) from the logits o (B, C): sigmoid, or softmax over the channels.
template <typename A>
inline void channel_gate(const A* o, A* ac, int64_t B, int64_t C, bool softmax) {
  for (int64_t b = 0; b < B; ++b) {
    const A* ob = o + b * C;
    A* a = ac + b * C;
    if (softmax) {
      A m = *std::max_element(ob, ob + C), s = 0;
      for (int64_t c = 0; c < C; ++c) s += a[c] = std::exp(ob[c] - m);
      for (int64_t c = 0; c < C; ++c) a[c] /= s;
    } else {
      using V = Vectorized<A>;
      const V to_log2(A(-kLog2e));
      for_lanes<A>(
          C, [&](int64_t c, int64_t n) { (V(1) / (V(1) + exp2(V::loadu(ob + c, n) * to_log2))).store(a + c, n); });
    }
  }
}

// The parameters of one call, checked and converted once to the accumulator dtype (contiguous).
struct Weights {
  std::vector<Tensor> conv_w, conv_b;  // (G * k_i) and (G) per channel group
  std::vector<int64_t> kernel_sizes;
  Tensor norm_h_weight, norm_h_bias, norm_w_weight, norm_w_bias, norm_c_weight, norm_c_bias;
  Tensor q_weight, k_weight, v_weight, q_bias, k_bias, v_bias;  // biases undefined without qkv_bias
};

Weights load_weights(int64_t C, at::ScalarType acc, at::TensorList conv_weights, at::TensorList conv_biases,
                     const Tensor& norm_h_weight, const Tensor& norm_h_bias, const Tensor& norm_w_weight,
                     const Tensor& norm_w_bias, const Tensor& norm_c_weight, const Tensor& norm_c_bias,
                     const Tensor& q_weight, const Tensor& k_weight, const Tensor& v_weight,
                     const std::optional<Tensor>& q_bias, const std::optional<Tensor>& k_bias,
                     const std::optional<Tensor>& v_bias);

// One forward call: the input, its parameters, and the outputs the passes fill. Each pass runs on
// samples [b0, b0 + nb).
struct Forward : Weights {
  Tensor x;
  bool channels_last;
  int64_t B, C, H, W, kh, kw, head_num;
  bool softmax;
  double eps;
  Tensor out, ph, pw, ah, aw, y, o;  // pw: (1, B, C, W), the Triton provider's banded layout with one band
};

// One backward call (backward.cpp): the forward's intermediates and the sums of the first
// full-size pass (gate_grads) in, per-sample results out. The small graphs of DESIGN.md 3.2 run
// per sample b, each writing only row b of dy / dph / dpw / partials, so samples run in parallel
// and the parameter gradients, partials summed over b in order, do not depend on the threads.
struct Backward : Weights {
  at::ScalarType dtype;  // x's
  int64_t B, C, H, W, kh, kw, head_num;
  bool softmax;
  double eps;
  Tensor ph, pw, ah, aw, y, o;  // the forward's: (B, C, H), (1, B, C, W), (B, C, H), (B, C, W), (B, C, N), (B, C)
  Tensor r, s, u, v;            // gate_grads' sums
  Tensor dy, dph, dpw;          // input_grad's: dL/dY / (KH KW), dL/dp_h / W, dL/dp_w / H
  Tensor partials;              // (B, P): each sample's parameter gradients, in the op's output order
  // Where each gradient starts in a row of partials: conv weights (4), conv biases (4), norm_h
  // weight and bias, norm_w, norm_c, q/k/v weights, q/k/v biases (with qkv_bias).
  std::vector<int64_t> at;
};

// The backward's full-size passes on samples [b0, b0 + nb) of tensors already checked (g and x
// dense in one layout, the small ones contiguous in the accumulator dtype): gate_grads' sums into
// r, s, u, v (gate_grad_sums allocates them), and dX.
std::tuple<Tensor, Tensor, Tensor, Tensor> gate_grad_sums(int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh,
                                                          int64_t kw, const at::TensorOptions& opts);
void gate_grads_samples(const Tensor& g, const Tensor& x, bool channels_last, const Tensor& ah, const Tensor& aw,
                        const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, int64_t kh, int64_t kw,
                        int64_t b0, int64_t nb);
void input_grad_samples(const Tensor& g, Tensor& dx, bool channels_last, const Tensor& ah, const Tensor& aw,
                        const Tensor& o, const Tensor& dy, const Tensor& dph, const Tensor& dpw, int64_t kh, int64_t kw,
                        bool softmax, int64_t b0, int64_t nb);

// Indices into Backward::at.
constexpr int kConvW = 0, kConvB = 4, kNormH = 8, kNormW = 10, kNormC = 12, kQkvW = 14, kQkvB = 17;

// Sample b's channel attention backward: dA = dL/da_c (C) in, a_c (C) out; writes dy[b] and the
// norm_c / q / k / v partials.
template <typename A>
void channel_attention_backward(Backward& bw, int64_t b, const A* dA, A* ac);
// Sample b's spatial gate backward of branch h (H) or w (W): da = dL/da (C, L) in; writes dph[b]
// or dpw[b] and the norm_h or norm_w partials, and adds into the conv partials.
template <typename A>
void spatial_gate_backward(Backward& bw, int64_t b, bool branch_w, const A* da);

// What F1-F3 run on: samples [b0, b0 + nb) and, of each, the channel groups [g0, g0 + ng) (the four
// GroupNorm groups: nothing in F1-F3 crosses them). A part of one group is one sample's run of
// NCHW planes; channels_last and several samples take all four.
struct Part {
  int64_t b0, nb, g0 = 0, ng = 4;
  // The part's first (sample, channel) plane: the offset, in planes, of its X, sums and gates.
  int64_t first_plane(int64_t C, bool channels_last) const {
    TORCH_INTERNAL_ASSERT(ng == 4 || (nb == 1 && !channels_last), "scsa_cpp: a part of some groups is one NCHW sample");
    return b0 * C + g0 * (C / 4);
  }
  int64_t planes(int64_t C) const { return nb * ng * (C / 4); }
};
void pool(Forward& f, const Part& part);
void spatial_gate(Forward& f, const Part& part);
void gated_pool(Forward& f, const Part& part);
void channel_attention(Forward& f, int64_t b0, int64_t nb);
void apply_gates(Forward& f, int64_t b0, int64_t nb);
// nonfinite.cpp: whether every parameter is finite, and the forward for when one is not.
bool parameters_finite(const Weights& f);
std::vector<Tensor> forward_eager(const Forward& f);

}  // namespace scsa
