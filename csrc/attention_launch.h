// Launcher-side pieces of the attention-map op shared by csrc/cpu/attention.cpp and
// csrc/cuda/attention.cu (host code only): argument checks (ValueError/TypeError naming the
// argument), the map's shape and dtype, and the dispatch on the exponent. Kept to light headers: the
// CUDA file avoids ATen/ATen.h (see DESIGN.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "attention_math.h"

namespace lasnn {

// Checks shared by lasnn::attention_map_fwd and lasnn::attention_map_bwd; device checks stay with
// each backend.
inline void check_attention_inputs(const at::Tensor& feat, double p, const char* op) {
  TORCH_CHECK_VALUE(feat.dim() == 4, op, ": feat must be [T, B, C, S] (the caller flattens space), got shape ",
                    feat.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(feat.scalar_type()), op, ": feat must be a floating tensor, got ",
                   feat.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, op, ": p must be finite and > 0, got ", p);
}

// The map is accumulated and returned in fp32 (fp64 for fp64 features).
inline at::ScalarType attention_map_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [B, S] for the time mean, [T, B, S] per step.
inline std::vector<int64_t> attention_map_shape(const at::Tensor& feat, bool time_mean) {
  if (time_mean) return {feat.size(1), feat.size(3)};
  return {feat.size(0), feat.size(1), feat.size(3)};
}

// The rows the kernels walk: R rows of [C, S], each averaged over TT steps that lie tstride = B*C*S
// apart. Time mean: R = B, TT = T; per step: R = T*B, TT = 1 ([T, B, C, S] contiguous is [T*B, C, S]).
struct AttentionRows {
  int64_t R, TT;
};

inline AttentionRows attention_rows(const at::Tensor& feat, bool time_mean) {
  return time_mean ? AttentionRows{feat.size(1), feat.size(0)} : AttentionRows{feat.size(0) * feat.size(1), 1};
}

// The backward's output buffer. In the time mean every step's gradient is the same (the mean is
// linear), so only one [1, B, C, S] slab is written and attention_grad_result returns it expanded over
// T (stride 0), as torch's own mean backward does: a student-sized write saved (and the page faults of
// a fresh student-sized buffer); consumers that need it dense materialise it.
inline at::Tensor attention_grad_buffer(const at::Tensor& feat, bool time_mean) {
  return time_mean ? at::empty({1, feat.size(1), feat.size(2), feat.size(3)}, feat.options())
                   : at::empty_like(feat, at::MemoryFormat::Contiguous);
}

inline at::Tensor attention_grad_result(const at::Tensor& buffer, const at::Tensor& feat, bool time_mean) {
  return time_mean ? buffer.expand(feat.sizes()) : buffer;
}

// The backward's incoming gradient must match the map the forward returned, on feat's device.
inline void check_attention_grad_map(const at::Tensor& grad_map, const at::Tensor& feat, bool time_mean) {
  const auto want = attention_map_shape(feat, time_mean);
  TORCH_CHECK_VALUE(grad_map.sizes() == at::IntArrayRef(want), "lasnn::attention_map_bwd: grad_map must have shape ",
                    at::IntArrayRef(want), ", got ", grad_map.sizes());
  TORCH_CHECK_VALUE(grad_map.device() == feat.device(), "lasnn::attention_map_bwd: grad_map is on ",
                    grad_map.device(), " but feat is on ", feat.device());
}

// Calls fn(std::integral_constant<int, PK>{}) with the exponent specialisation for p
// (attention_pow_kind: 1, 2, 3, or 0 for a general p).
template <typename F>
void dispatch_attention_pow(double p, F&& fn) {
  switch (attention_pow_kind(p)) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace lasnn
