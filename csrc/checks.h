// Tensor checks (TORCH_CHECK with the offending shape, dtype or device), the layout rule, and the
// allocation of every pass output.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

namespace scsa {

using at::Tensor;

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

}  // namespace scsa
