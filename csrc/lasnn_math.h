// One LIF step and the surrogate gradients, shared by the C++ CPU and CUDA kernels so that the
// formula the CPU tests check is the one the GPU runs. Reference: lasnn/reference/lif.py
// (SpikingJelly's multi-step LIFNode semantics).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LASNN_HD __host__ __device__ __forceinline__
#else
#define LASNN_HD inline
#endif

namespace lasnn {

enum Surrogate : int64_t { kSigmoid = 0, kAtan = 1, kTriangle = 2, kRect = 3 };

// Scalar parameters of the neuron, derived once by the launcher.
template <typename acc_t>
struct LIFParams {
  acc_t inv_tau;       // 1/tau (0 for the IF neuron, tau = inf)
  acc_t v_threshold;
  acc_t v_reset;       // hard reset value (ignored for soft reset)
  bool soft_reset;
  bool decay_input;    // false also when tau = inf: H = V + X
  bool detach_reset;
  int64_t surrogate;
  acc_t alpha;
};

// Kernel parameters from the op's arguments (host code; both launchers use it so that the CPU and
// CUDA kernels run the same arithmetic).
template <typename acc_t>
inline LIFParams<acc_t> make_params(double tau, double v_threshold, double v_reset, bool soft_reset,
                                    bool decay_input, bool detach_reset, int64_t surrogate, double alpha) {
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

// exp(x) for float without libm, branch-free so that compilers vectorise the loops that call it.
// Cody-Waite range reduction and a degree-6 polynomial: max relative error about 2 ulp on the
// range used by the surrogates. NaN in gives NaN out; +-inf saturate.
LASNN_HD float fast_exp(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -88.0f ? -88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n by building the exponent bits; n is in [-127, 127] after the clamp above.
  union {
    int32_t i;
    float f;
  } u;
  u.i = (static_cast<int32_t>(n) + 127) << 23;
  return p * u.f;
}
LASNN_HD double fast_exp(double x) { return std::exp(x); }

// dS/dH as a function of x = H - v_threshold (SpikingJelly's surrogate.* with the given alpha).
template <typename acc_t>
LASNN_HD acc_t surrogate_grad(acc_t x, int64_t kind, acc_t alpha) {
  switch (kind) {
    case kSigmoid: {
      const acc_t s = acc_t(1) / (acc_t(1) + fast_exp(-alpha * x));
      return alpha * s * (acc_t(1) - s);
    }
    case kAtan: {
      const acc_t z = acc_t(1.5707963267948966) * alpha * x;
      return alpha / (acc_t(2) * (acc_t(1) + z * z));
    }
    case kTriangle: {
      const acc_t g = alpha - alpha * alpha * std::fabs(x);
      return g > acc_t(0) ? g : (x != x ? x : acc_t(0));  // keep NaN
    }
    default: {  // kRect
      const acc_t ax = std::fabs(x);
      return ax < acc_t(0.5) / alpha ? alpha : (x != x ? x : acc_t(0));
    }
  }
}

// Charge: H = V + (X - (V - V_reset)) / tau   (decay_input)
//         H = V - (V - V_reset) / tau + X     (otherwise); V_reset counts as 0 for soft reset.
template <typename acc_t>
LASNN_HD acc_t lif_charge(acc_t v, acc_t x, const LIFParams<acc_t>& P) {
  const acc_t vr = P.soft_reset ? acc_t(0) : P.v_reset;
  return P.decay_input ? v + (x - (v - vr)) * P.inv_tau : v - (v - vr) * P.inv_tau + x;
}

// Fire and reset: returns the spike (0/1) and writes the new membrane.
template <typename acc_t>
LASNN_HD acc_t lif_fire_reset(acc_t h, acc_t* v, const LIFParams<acc_t>& P) {
  const acc_t s = h >= P.v_threshold ? acc_t(1) : acc_t(0);
  *v = P.soft_reset ? h - s * P.v_threshold : s * P.v_reset + (acc_t(1) - s) * h;
  return s;
}

// One reverse step. Given H_t, dL/dS_t and dL/dV_t (the gradient flowing back from step t+1),
// returns dL/dX_t and replaces *gv with dL/dV_{t-1}.
//   dV_t/dH_t = 1 - S (+ (V_reset - H) S')            hard reset
//             = 1     (- V_th S')                      soft reset   (S' dropped when detach_reset)
template <typename acc_t>
LASNN_HD acc_t lif_backward_step(acc_t h, acc_t gs, acc_t* gv, const LIFParams<acc_t>& P) {
  const acc_t sg = surrogate_grad<acc_t>(h - P.v_threshold, P.surrogate, P.alpha);
  const acc_t s = h >= P.v_threshold ? acc_t(1) : acc_t(0);
  acc_t dvdh;
  if (P.soft_reset) {
    dvdh = P.detach_reset ? acc_t(1) : acc_t(1) - P.v_threshold * sg;
  } else {
    dvdh = P.detach_reset ? acc_t(1) - s : acc_t(1) - s + (P.v_reset - h) * sg;
  }
  const acc_t gh = gs * sg + (*gv) * dvdh;
  *gv = gh * (acc_t(1) - P.inv_tau);
  return P.decay_input ? gh * P.inv_tau : gh;
}

}  // namespace lasnn
