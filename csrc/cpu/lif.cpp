// Fused multi-step LIF forward/backward on CPU: the time loop runs inside one call, the membrane
// of a block of neurons stays in a small stack array, and threads split the neurons (at::parallel_for,
// OpenMP). The inner loops over a block are plain arrays of the accumulation type, which gcc
// vectorises. Math: csrc/lasnn_math.h; oracle: lasnn/reference/lif.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lasnn_math.h"

namespace lasnn {
namespace {

constexpr int64_t kFwdBlock = 256;

void check_lif_inputs(const at::Tensor& x, const std::optional<at::Tensor>& v_init, double tau, double v_threshold,
                      double alpha, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, N] (the caller flattens), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ", x.scalar_type());
  if (v_init.has_value()) {
    const auto& v = *v_init;
    TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), op, ": v_init must be [N] = [", x.size(1), "], got ",
                v.sizes());
    TORCH_CHECK(v.scalar_type() == x.scalar_type(), op, ": v_init dtype ", v.scalar_type(), " != x dtype ",
                x.scalar_type());
    TORCH_CHECK(v.device() == x.device(), op, ": v_init is on ", v.device(), " but x is on ", x.device());
  }
  TORCH_CHECK(tau > 0 && !std::isnan(tau), op, ": tau must be > 0 (inf for IF), got ", tau);
  TORCH_CHECK(std::isfinite(v_threshold), op, ": v_threshold must be finite, got ", v_threshold);
  TORCH_CHECK(alpha > 0 && std::isfinite(alpha), op, ": alpha must be finite and > 0, got ", alpha);
}

template <typename acc_t>
LIFParams<acc_t> make_params(double tau, double v_threshold, double v_reset, bool soft_reset, bool decay_input,
                             bool detach_reset, int64_t surrogate, double alpha) {
  LIFParams<acc_t> P;
  P.inv_tau = std::isinf(tau) ? acc_t(0) : acc_t(1.0 / tau);
  P.v_threshold = acc_t(v_threshold);
  P.v_reset = acc_t(v_reset);
  P.soft_reset = soft_reset;
  P.decay_input = decay_input && !std::isinf(tau);  // IF neuron: H = V + X
  P.detach_reset = detach_reset;
  P.surrogate = surrogate;
  P.alpha = acc_t(alpha);
  return P;
}

std::tuple<at::Tensor, at::Tensor> lif_fwd_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& v_init_,
                                               double tau, double v_threshold, double v_reset, bool soft_reset,
                                               bool decay_input) {
  check_lif_inputs(x_, v_init_, tau, v_threshold, 1.0, "lasnn::lif_fwd");
  TORCH_CHECK(x_.device().is_cpu(), "lasnn::lif_fwd (cpu): x must be on CPU");
  const at::Tensor x = x_.contiguous();
  const int64_t T = x.size(0), N = x.size(1);
  at::Tensor spikes = at::empty_like(x);
  at::Tensor v_last;
  at::Tensor v_init;
  if (v_init_.has_value()) v_init = v_init_->contiguous();
  if (T == 0) {
    v_last = v_init.defined() ? v_init.clone() : at::zeros({N}, x.options());
    return {spikes, v_last};
  }
  v_last = at::empty({N}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input, false, 0, 1.0);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* v0 = v_init.defined() ? v_init.data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = spikes.data_ptr<scalar_t>();
    scalar_t* vl = v_last.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4 * kFwdBlock, [&](int64_t begin, int64_t end) {
      acc_t v[kFwdBlock];
      for (int64_t n0 = begin; n0 < end; n0 += kFwdBlock) {
        const int64_t nb = std::min(kFwdBlock, end - n0);
        for (int64_t i = 0; i < nb; ++i) v[i] = v0 ? acc_t(v0[n0 + i]) : acc_t(0);
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* xt = xp + t * N + n0;
          scalar_t* st = sp + t * N + n0;
          _Pragma("omp simd")
          for (int64_t i = 0; i < nb; ++i) {
            const acc_t h = lif_charge<acc_t>(v[i], acc_t(xt[i]), P);
            st[i] = scalar_t(lif_fire_reset<acc_t>(h, &v[i], P));
          }
        }
        for (int64_t i = 0; i < nb; ++i) vl[n0 + i] = scalar_t(v[i]);
      }
    });
  });
  return {spikes, v_last};
}

// Backward from the saved input: for a block of neurons, recompute H_t into a scratch buffer
// that stays in cache (T x block), then walk time in reverse. Reads x and grad_spikes once and
// writes grad_x once: the minimum traffic for this op.
std::tuple<at::Tensor, at::Tensor> lif_bwd_cpu(const at::Tensor& grad_spikes_, const std::optional<at::Tensor>& grad_v_last_,
                                               const at::Tensor& x_, const std::optional<at::Tensor>& v_init_,
                                               double tau, double v_threshold, double v_reset, bool soft_reset,
                                               bool decay_input, bool detach_reset, int64_t surrogate,
                                               double alpha) {
  check_lif_inputs(x_, v_init_, tau, v_threshold, alpha, "lasnn::lif_bwd");
  TORCH_CHECK(x_.device().is_cpu(), "lasnn::lif_bwd (cpu): x must be on CPU");
  TORCH_CHECK(grad_spikes_.sizes() == x_.sizes(), "lasnn::lif_bwd: grad_spikes must match x's shape ", x_.sizes(),
              ", got ", grad_spikes_.sizes());
  TORCH_CHECK(surrogate >= 0 && surrogate <= 3, "lasnn::lif_bwd: surrogate must be 0..3, got ", surrogate);
  const at::Tensor x = x_.contiguous();
  const at::Tensor gs = grad_spikes_.to(x.scalar_type()).contiguous();
  const int64_t T = x.size(0), N = x.size(1);
  at::Tensor v_init, gvl;
  if (v_init_.has_value()) v_init = v_init_->contiguous();
  if (grad_v_last_.has_value()) {
    TORCH_CHECK(grad_v_last_->dim() == 1 && grad_v_last_->size(0) == N,
                "lasnn::lif_bwd: grad_v_last must be [N] = [", N, "], got ", grad_v_last_->sizes());
    gvl = grad_v_last_->to(x.scalar_type()).contiguous();
  }
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_v_init = at::empty({N}, x.options());
  if (T == 0) {
    if (gvl.defined()) grad_v_init.copy_(gvl); else grad_v_init.zero_();
    return {grad_x, grad_v_init};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input, detach_reset, surrogate,
                                      alpha);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gsp = gs.data_ptr<scalar_t>();
    const scalar_t* v0 = v_init.defined() ? v_init.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gvlp = gvl.defined() ? gvl.data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gvip = grad_v_init.data_ptr<scalar_t>();
    // Scratch of at most 64 KiB per thread: block = 16..1024 neurons.
    const int64_t blk = std::max<int64_t>(16, std::min<int64_t>(1024, (65536 / int64_t(sizeof(acc_t)) / T) / 16 * 16));
    at::parallel_for(0, N, 2 * blk, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> hbuf(static_cast<size_t>(T * blk));
      std::vector<acc_t> v(blk), gv(blk);
      for (int64_t n0 = begin; n0 < end; n0 += blk) {
        const int64_t nb = std::min(blk, end - n0);
        acc_t* vv = v.data();
        acc_t* gg = gv.data();
        for (int64_t i = 0; i < nb; ++i) vv[i] = v0 ? acc_t(v0[n0 + i]) : acc_t(0);
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* xt = xp + t * N + n0;
          acc_t* ht = hbuf.data() + t * blk;
          _Pragma("omp simd")
          for (int64_t i = 0; i < nb; ++i) {
            const acc_t h = lif_charge<acc_t>(vv[i], acc_t(xt[i]), P);
            ht[i] = h;
            lif_fire_reset<acc_t>(h, &vv[i], P);
          }
        }
        for (int64_t i = 0; i < nb; ++i) gg[i] = gvlp ? acc_t(gvlp[n0 + i]) : acc_t(0);
        for (int64_t t = T - 1; t >= 0; --t) {
          const acc_t* ht = hbuf.data() + t * blk;
          const scalar_t* gst = gsp + t * N + n0;
          scalar_t* gxt = gxp + t * N + n0;
          _Pragma("omp simd")
          for (int64_t i = 0; i < nb; ++i) {
            gxt[i] = scalar_t(lif_backward_step<acc_t>(ht[i], acc_t(gst[i]), &gg[i], P));
          }
        }
        for (int64_t i = 0; i < nb; ++i) gvip[n0 + i] = scalar_t(gg[i]);
      }
    });
  });
  return {grad_x, grad_v_init};
}

}  // namespace

TORCH_LIBRARY_IMPL(lasnn, CPU, m) {
  m.impl("lif_fwd", &lif_fwd_cpu);
  m.impl("lif_bwd", &lif_bwd_cpu);
}

}  // namespace lasnn
