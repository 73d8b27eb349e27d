// |x|^p and its derivative for the attention-map kernels, shared by the C++ CPU and CUDA kernels so
// that the formula the CPU tests check is the one the GPU runs. Oracle: lasnn/reference/attention.py
// (attention_map_raw_reference, abs_pow_grad_reference).
//
// PK selects a specialisation of the exponent: 1, 2, 3 (exact, vectorisable, no pow()) or 0 (any p > 0
// through pow). Attention transfer uses p = 2 almost always, so the common case costs one multiply.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LASNN_ATT_HD __host__ __device__ __forceinline__
#else
#define LASNN_ATT_HD inline
#endif

namespace lasnn {

// Exponent specialisation for p (0 = general).
inline int attention_pow_kind(double p) {
  if (p == 1.0) return 1;
  if (p == 2.0) return 2;
  if (p == 3.0) return 3;
  return 0;
}

// |x|^p
template <int PK, typename acc_t>
LASNN_ATT_HD acc_t abs_pow(acc_t x, acc_t p) {
  if constexpr (PK == 1) {
    return std::fabs(x);
  } else if constexpr (PK == 2) {
    return x * x;
  } else if constexpr (PK == 3) {
    return std::fabs(x) * x * x;
  } else {
    return std::pow(std::fabs(x), p);
  }
}

// d|x|^p/dx = p |x|^(p-1) sign(x), defined as 0 at x = 0 for every p > 0 (the general formula is
// 0 * inf there for p < 1).
template <int PK, typename acc_t>
LASNN_ATT_HD acc_t abs_pow_grad(acc_t x, acc_t p) {
  if constexpr (PK == 1) {
    return acc_t(x > acc_t(0)) - acc_t(x < acc_t(0));
  } else if constexpr (PK == 2) {
    return acc_t(2) * x;
  } else if constexpr (PK == 3) {
    return acc_t(3) * x * std::fabs(x);
  } else {
    const acc_t a = std::fabs(x);
    const acc_t sgn = acc_t(x > acc_t(0)) - acc_t(x < acc_t(0));
    return a > acc_t(0) ? p * std::pow(a, p - acc_t(1)) * sgn : acc_t(0);
  }
}

}  // namespace lasnn
