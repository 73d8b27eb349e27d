// Launcher-side pieces of the LIF op shared by csrc/cpu/lif.cpp and csrc/cuda/lif.cu (host code only):
// argument checks (ValueError/TypeError naming the argument), the preparation of the input and output
// tensors, and the derivation of the kernel parameters, so both backends validate alike, handle the
// empty cases alike and run the same arithmetic.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

#include "lasnn_math.h"

namespace lasnn {

// The instruction set the fp32/bf16 CPU LIF kernels use here: "avx512", "avx2" or "base" (csrc/cpu/lif.cpp).
std::string cpu_lif_isa_name();

// Checks shared by lasnn::lif_fwd and lasnn::lif_bwd; device checks stay with each backend.
inline void check_lif_inputs(const at::Tensor& x, const std::optional<at::Tensor>& v_init, double tau,
                             double v_threshold, double v_reset, double alpha, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [T, N] (the caller flattens), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": x must be float16, bfloat16, float32 or float64, got ", dt);
  if (v_init.has_value()) {
    const auto& v = *v_init;
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(1), op, ": v_init must be [N] = [", x.size(1), "], got ",
                      v.sizes());
    TORCH_CHECK_TYPE(v.scalar_type() == x.scalar_type(), op, ": v_init dtype ", v.scalar_type(), " != x dtype ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(v.device() == x.device(), op, ": v_init is on ", v.device(), " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(tau > 0 && !std::isnan(tau), op, ": tau must be > 0 (inf for IF), got ", tau);
  TORCH_CHECK_VALUE(std::isfinite(v_threshold), op, ": v_threshold must be finite, got ", v_threshold);
  TORCH_CHECK_VALUE(std::isfinite(v_reset), op, ": v_reset must be finite, got ", v_reset);
  TORCH_CHECK_VALUE(alpha > 0 && std::isfinite(alpha), op, ": alpha must be finite and > 0, got ", alpha);
}

// Checks of the backward's incoming gradients against x ([T, N]); shared by both backends.
inline void check_lif_bwd_grads(const at::Tensor& grad_spikes, const std::optional<at::Tensor>& grad_v_last,
                                const at::Tensor& x, int64_t surrogate) {
  TORCH_CHECK_VALUE(grad_spikes.sizes() == x.sizes(), "lasnn::lif_bwd: grad_spikes must match x's shape ", x.sizes(),
                    ", got ", grad_spikes.sizes());
  TORCH_CHECK_VALUE(grad_spikes.device() == x.device(), "lasnn::lif_bwd: grad_spikes is on ", grad_spikes.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(surrogate >= 0 && surrogate <= 3, "lasnn::lif_bwd: surrogate must be 0..3, got ", surrogate);
  if (grad_v_last.has_value()) {
    TORCH_CHECK_VALUE(grad_v_last->dim() == 1 && grad_v_last->size(0) == x.size(1),
                      "lasnn::lif_bwd: grad_v_last must be [N] = [", x.size(1), "], got ", grad_v_last->sizes());
    TORCH_CHECK_VALUE(grad_v_last->device() == x.device(), "lasnn::lif_bwd: grad_v_last is on ",
                      grad_v_last->device(), " but x is on ", x.device());
  }
}

// The tensors of one lif_fwd call, after the checks: inputs contiguous, outputs allocated. `done`: no
// step or no neuron, so there is nothing to launch (v_last is then v_init, or zeros).
struct LifFwdTensors {
  at::Tensor x, v_init, spikes, v_last;
  bool done;
};

inline LifFwdTensors prepare_lif_fwd(const at::Tensor& x_, const std::optional<at::Tensor>& v_init_) {
  LifFwdTensors t;
  t.x = x_.contiguous();
  const int64_t T = t.x.size(0), N = t.x.size(1);
  if (v_init_.has_value()) t.v_init = v_init_->contiguous();
  t.spikes = at::empty_like(t.x, at::MemoryFormat::Contiguous);
  t.done = T == 0 || N == 0;
  if (t.done) {
    t.v_last = t.v_init.defined() ? t.v_init.clone() : at::zeros({N}, t.x.options());
  } else {
    t.v_last = at::empty({N}, t.x.options());
  }
  return t;
}

// The same for lif_bwd: the incoming gradients are cast to x's dtype. `done`: no step or no neuron;
// grad_v_init is then dL/dv_last (or zeros).
// With `row_broadcast` (a kernel that can read it), a grad_spikes of x's dtype whose neuron stride is 0
// (one value per step, broadcast: what spikes.mean() or spikes.sum() send back) is kept as the expanded
// view it is, with gs_step_stride its step stride (0 when it is one value for all steps): it is never
// materialised as a [T, N] tensor.
struct LifBwdTensors {
  at::Tensor x, gs, v_init, gvl, grad_x, grad_v_init;
  bool done;
  bool gs_row_broadcast = false;
  int64_t gs_step_stride = 0;
};

inline LifBwdTensors prepare_lif_bwd(const at::Tensor& grad_spikes_, const std::optional<at::Tensor>& grad_v_last_,
                                     const at::Tensor& x_, const std::optional<at::Tensor>& v_init_,
                                     bool row_broadcast = false) {
  LifBwdTensors t;
  t.x = x_.contiguous();
  if (row_broadcast && grad_spikes_.scalar_type() == t.x.scalar_type() && grad_spikes_.size(1) > 1 &&
      grad_spikes_.stride(1) == 0) {
    t.gs = grad_spikes_;
    t.gs_row_broadcast = true;
    t.gs_step_stride = grad_spikes_.size(0) > 1 ? grad_spikes_.stride(0) : 0;
  } else {
    t.gs = grad_spikes_.to(t.x.scalar_type()).contiguous();
  }
  const int64_t T = t.x.size(0), N = t.x.size(1);
  if (v_init_.has_value()) t.v_init = v_init_->contiguous();
  if (grad_v_last_.has_value()) t.gvl = grad_v_last_->to(t.x.scalar_type()).contiguous();
  t.grad_x = at::empty_like(t.x, at::MemoryFormat::Contiguous);
  t.grad_v_init = at::empty({N}, t.x.options());
  t.done = T == 0 || N == 0;
  if (t.done) {
    if (t.gvl.defined()) {
      t.grad_v_init.copy_(t.gvl);
    } else {
      t.grad_v_init.zero_();
    }
  }
  return t;
}

}  // namespace lasnn
