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

// ---- The formulas, with the neuron flags as template parameters. The CPU kernels instantiate
// these directly (branch-free loops that gcc vectorises: csrc/cpu/lif.cpp, compiled with
// -fno-trapping-math so that the compares below if-convert); the CUDA kernels go through the
// runtime-flag wrappers further down. No FMA on CPU (-ffp-contract=off): every CPU path (baseline,
// AVX2, AVX-512) gives the same bits.

// Charge: H = V + (X - (V - V_reset)) / tau   (DECAY, i.e. decay_input)
//         H = V - (V - V_reset) / tau + X     (otherwise); V_reset counts as 0 for soft reset.
template <bool SOFT, bool DECAY, typename F>
LASNN_HD F charge(F v, F x, F inv_tau, F v_reset) {
  const F vr = SOFT ? F(0) : v_reset;
  return DECAY ? v + (x - (v - vr)) * inv_tau : v - (v - vr) * inv_tau + x;
}

// Fire: S = (H >= V_th) as 0/1 (0 for NaN H).
template <typename F>
LASNN_HD F spike(F h, F v_threshold) {
  return h >= v_threshold ? F(1) : F(0);
}

// Reset given the spike: soft V = H - S V_th; hard V = S V_reset + (1 - S) H (kept as arithmetic,
// as the reference: NaN for H = +inf).
template <bool SOFT, typename F>
LASNN_HD F reset(F h, F s, F v_threshold, F v_reset) {
  return SOFT ? h - s * v_threshold : s * v_reset + (F(1) - s) * h;
}

// The sigmoid surrogate alpha * sigma(alpha x) * (1 - sigma(alpha x)) in fp32, written as
// alpha * e / (1 + e)^2 with e = exp(-alpha |x|) (the function is even in x): e is in (0, 1] and only
// underflow needs a clamp. exp goes through 2^z: z = y log2(e), n = round(z) with the 1.5 * 2^23
// magic constant (no vector floor before SSE4.1), a degree-5 minimax polynomial for 2^(z - n) on
// [-1/2, 1/2] (relative error 2.3e-7 in fp32 Horner), times 2^n built from the exponent bits.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
constexpr float kSigmoidClamp = -87.0f;     // keeps n >= -126: 2^n stays a normal float
constexpr float kExp2C0 = 1.0000001192092896f, kExp2C1 = 0.6931469440460205f, kExp2C2 = 0.24022120237350464f,
                kExp2C3 = 0.05550713092088699f, kExp2C4 = 0.009675541892647743f,
                kExp2C5 = 0.001327647129073739f;

LASNN_HD float sigmoid_surrogate(float x, float alpha) {
  float y = std::fabs(x) * -alpha;
  y = !(y >= kSigmoidClamp) ? kSigmoidClamp : y;  // below the clamp, or NaN (put back at the end)
  const float z = y * kLog2e;
  const float n = (z + kRoundMagic) - kRoundMagic;
  const float f = z - n;
  float p = kExp2C5;
  p = p * f + kExp2C4;
  p = p * f + kExp2C3;
  p = p * f + kExp2C2;
  p = p * f + kExp2C1;
  p = p * f + kExp2C0;
  union {
    int32_t i;
    float f;
  } two_n;
  two_n.i = (static_cast<int32_t>(n) + 127) << 23;
  const float e = p * two_n.f;
  const float t = 1.0f + e;
  const float g = alpha * (e / (t * t));
  return x != x ? x : g;
}
LASNN_HD double sigmoid_surrogate(double x, double alpha) {
  const double s = 1.0 / (1.0 + std::exp(-alpha * x));
  const double g = alpha * s * (1.0 - s);
  return x != x ? x : g;
}

// dS/dH as a function of x = H - v_threshold (SpikingJelly's surrogate.* with the given alpha).
// NaN in gives NaN out for every kind.
template <int64_t SG, typename F>
LASNN_HD F surrogate(F x, F alpha) {
  if constexpr (SG == kSigmoid) {
    return sigmoid_surrogate(x, alpha);
  } else if constexpr (SG == kAtan) {
    const F z = F(1.5707963267948966) * alpha * x;
    return alpha / (F(2) * (F(1) + z * z));
  } else if constexpr (SG == kTriangle) {
    const F g = alpha - alpha * alpha * std::fabs(x);
    return g > F(0) ? g : (x != x ? x : F(0));
  } else {  // kRect
    return std::fabs(x) < F(0.5) / alpha ? alpha : (x != x ? x : F(0));
  }
}

// One reverse step given the surrogate sg = S'(H_t - V_th). Given H_t, dL/dS_t and dL/dV_t (the
// gradient flowing back from step t+1), returns dL/dX_t and replaces *gv with dL/dV_{t-1}.
//   dV_t/dH_t = 1 - S (+ (V_reset - H) S')            hard reset
//             = 1     (- V_th S')                      soft reset   (S' dropped when detach_reset)
// The flags are plain arguments: backward_step passes constants (folded after inlining), the CUDA
// wrapper passes LIFParams' fields.
template <typename F>
LASNN_HD F backward_from_sg(F h, F gs, F* gv, F sg, bool soft, bool decay, bool detach, F inv_tau, F v_threshold,
                            F v_reset) {
  F dvdh;
  if (soft) {
    dvdh = detach ? F(1) : F(1) - v_threshold * sg;
  } else {
    const F s = spike(h, v_threshold);
    dvdh = detach ? F(1) - s : F(1) - s + (v_reset - h) * sg;
  }
  const F gh = gs * sg + (*gv) * dvdh;
  *gv = gh * (F(1) - inv_tau);
  return decay ? gh * inv_tau : gh;
}

template <bool SOFT, bool DECAY, bool DETACH, int64_t SG, typename F>
LASNN_HD F backward_step(F h, F gs, F* gv, F inv_tau, F v_threshold, F v_reset, F alpha) {
  const F sg = surrogate<SG, F>(h - v_threshold, alpha);
  return backward_from_sg(h, gs, gv, sg, SOFT, DECAY, DETACH, inv_tau, v_threshold, v_reset);
}

// ---- Runtime-flag forms (CUDA kernels): the same formulas, the flags read from LIFParams.

template <typename acc_t>
LASNN_HD acc_t surrogate_grad(acc_t x, int64_t kind, acc_t alpha) {
  switch (kind) {
    case kSigmoid: return surrogate<kSigmoid, acc_t>(x, alpha);
    case kAtan: return surrogate<kAtan, acc_t>(x, alpha);
    case kTriangle: return surrogate<kTriangle, acc_t>(x, alpha);
    default: return surrogate<kRect, acc_t>(x, alpha);
  }
}

template <typename acc_t>
LASNN_HD acc_t lif_charge(acc_t v, acc_t x, const LIFParams<acc_t>& P) {
  if (P.soft_reset) {
    return P.decay_input ? charge<true, true>(v, x, P.inv_tau, P.v_reset)
                         : charge<true, false>(v, x, P.inv_tau, P.v_reset);
  }
  return P.decay_input ? charge<false, true>(v, x, P.inv_tau, P.v_reset)
                       : charge<false, false>(v, x, P.inv_tau, P.v_reset);
}

// Fire and reset: returns the spike (0/1) and writes the new membrane.
template <typename acc_t>
LASNN_HD acc_t lif_fire_reset(acc_t h, acc_t* v, const LIFParams<acc_t>& P) {
  const acc_t s = spike(h, P.v_threshold);
  *v = P.soft_reset ? reset<true>(h, s, P.v_threshold, P.v_reset) : reset<false>(h, s, P.v_threshold, P.v_reset);
  return s;
}

template <typename acc_t>
LASNN_HD acc_t lif_backward_step(acc_t h, acc_t gs, acc_t* gv, const LIFParams<acc_t>& P) {
  const acc_t sg = surrogate_grad<acc_t>(h - P.v_threshold, P.surrogate, P.alpha);
  return backward_from_sg(h, gs, gv, sg, P.soft_reset, P.decay_input, P.detach_reset, P.inv_tau, P.v_threshold,
                          P.v_reset);
}

}  // namespace lasnn
