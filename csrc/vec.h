// at::vec building blocks of the passes: loads and stores that widen bf16/fp16 to accumulator
// lanes, partial vectors, lane reductions and window sums, exp2, and loops over whole vectors.
// Every pass accumulates in at::opmath_type (fp32, or fp64 for fp64 inputs).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <type_traits>
#include <utility>

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
// stores stay at::vec's: a vmaskmov store is slow on AMD's cores.)
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
// store that a vector load cannot forward from (a store-forwarding stall per lane, which dominated
// the 7x7 channel attention's fp64 power series). Ours stores once and reads the lanes back, in
// the fallback's order.
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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Lane i: the sum of rows[i]'s 8 lanes. The tree of row_sums4 taken twice as wide: 6 hadds, 2 lane
// permutes and an add for eight rows, each row's lanes summed in row_sums4's order.
C10_ALWAYS_INLINE __m256 row_sums8(const __m256 (&rows)[8]) {
  // [r0 r1 r2 r3 (lanes 0-3 summed) | r0 r1 r2 r3 (lanes 4-7 summed)], and the same of r4-r7
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(rows[0], rows[1]), _mm256_hadd_ps(rows[2], rows[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(rows[4], rows[5]), _mm256_hadd_ps(rows[6], rows[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// y[r * wo + j] = scale * sum_{t < kw} row[r * stride + j * kw + t] for r < rows, j < wo: the
// windows of `rows` rows `stride` apart, their sums back to back; each row must be readable to
// (wo - 1) * kw + one vector. fp32 windows of at most one vector: a window is the vector loaded at
// its first column with the lanes past kw cleared, and row_sums4 sums four such windows, of one row
// or consecutive ones, in one transpose-and-add tree (~8 instructions a window where the scalar
// loop takes ~2 a column; taking the rows together keeps narrow maps, 1-3 windows a row, on it).
// (One vgatherdps of 8 windows' columns a tap needs fewer instructions still, but a gather's
// latency makes it slower: DESIGN.md section 6.)
template <typename A>
inline void window_sums(const A* row, A* y, int64_t kw, int64_t wo, A scale, int64_t rows = 1, int64_t stride = 0) {
  using V = Vectorized<A>;
  const int64_t count = rows * wo;
  if constexpr (std::is_same_v<A, float>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (kw <= 8 && count >= 8) {  // windows of at most 8 lanes, eight to a row_sums8 (fewer, below)
      const __m256 keep = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(int(kw)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      const __m256 scaled = _mm256_set1_ps(scale);
      int64_t r = 0, j = 0;  // the next window's row and index in it
      for (int64_t w = 0; w < count; w += 8) {
        const int64_t n = std::min<int64_t>(8, count - w);
        __m256 windows[8];
        for (int64_t i = 0; i < 8; ++i) {
          windows[i] = i < n ? _mm256_and_ps(_mm256_loadu_ps(row + r * stride + j * kw), keep) : _mm256_setzero_ps();
          if (++j == wo) j = 0, ++r;
        }
        const __m256 sums = _mm256_mul_ps(row_sums8(windows), scaled);
        if (n == 8) {
          _mm256_storeu_ps(y + w, sums);
          continue;
        }
        alignas(32) A part[8];
        _mm256_store_ps(part, sums);
        std::copy(part, part + n, y + w);
      }
      return;
    }
#endif
    if (kw <= V::size() && count >= 4) {  // (fewer windows cost the tree more than the loop)
      const V keep = V::set(V(0), V(0) == V(0), kw);
      int64_t r = 0, j = 0;  // the next window's row and index in it
      for (int64_t w = 0; w < count; w += 4) {
        const int64_t n = std::min<int64_t>(4, count - w);
        V windows[4];
        for (int64_t i = 0; i < 4; ++i) {
          windows[i] = i < n ? V::loadu(row + r * stride + j * kw) & keep : V(0);
          if (++j == wo) j = 0, ++r;
        }
        if (n == 4) {  // straight into y: a bounce buffer became a variable-length memcpy
          row_sums4(windows, y + w, false);
          if (scale != A(1))
            for (int64_t i = 0; i < 4; ++i) y[w + i] *= scale;
          continue;
        }
        alignas(16) A sums[4];
        row_sums4(windows, sums, false);
        for (int64_t i = 0; i < n; ++i) y[w + i] = sums[i] * scale;
      }
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < wo; ++j) {
      A s = 0;
      for (int64_t t = j * kw; t < (j + 1) * kw; ++t) s += row[r * stride + t];
      y[r * wo + j] = s * scale;
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

// One run of for_runs: `size` vectors from column w0, NF whole ones and, with kTail, a last one of
// `tail` lanes.
template <typename A, int NF, bool kTail>
struct Run {
  static constexpr int size = NF + kTail;
  int64_t w0, tail;
  // Lanes of the run's k-th vector (L for the whole ones: loops over k unroll and fold it).
  constexpr int64_t lanes(int k) const { return k < NF ? Vectorized<A>::size() : tail; }
};

// Column runs for loops that keep one accumulator a vector in registers: calls f(Run) for runs of
// at most 8 vectors, the last one partial where len is not a whole number of vectors. The counts
// are compile-time, so the hot loops carry no per-vector checks (a runtime count cost two tests
// and two taken jumps a vector).
template <typename A, int NF = 0, typename F>
inline void run_of(int64_t full, int64_t tail, int64_t w0, const F& f) {
  if constexpr (NF < 8)
    if (full != NF) return run_of<A, NF + 1>(full, tail, w0, f);
  if (tail)
    f(Run<A, NF, true>{w0, tail});
  else if constexpr (NF > 0)  // (no run is empty)
    f(Run<A, NF, false>{w0, 0});
}

template <typename A, typename F>
inline void for_runs(int64_t len, const F& f) {
  constexpr int64_t L = Vectorized<A>::size();
  int64_t w0 = 0;
  for (; len - w0 >= 9 * L; w0 += 8 * L) f(Run<A, 8, false>{w0, 0});
  if (len > w0) run_of<A>((len - w0) / L, (len - w0) % L, w0, f);
}

}  // namespace scsa
