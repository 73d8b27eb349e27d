// The fp32 LIF forward and backward written with SIMD intrinsics, once, over a small vector
// type `Vec` (16 lanes of AVX-512 or 8 lanes of AVX2, defined below). csrc/cpu/lif.cpp includes this
// file inside namespace lasnn::cpu_lif::isa_avx512 (with LASNN_SIMD_AVX512, under
// `#pragma GCC target("avx512f,...")` and fp-contract=off) and inside isa_avx2 (with LASNN_SIMD_AVX2,
// target "avx2", which has no FMA), after that namespace's generic kernels.
//
// Why hand-written kernels: the backward is compute-bound (measured on Zen 4, one thread, sigmoid:
// 1.2 ns per element-step whether the data sat in L2 or in DRAM). gcc vectorises the generic kernels
// only through integer bit tricks (a float compare stays scalar under -ftrapping-math, see lif.cpp),
// so every spike test, clamp and NaN check costs 3-5 instructions where a compare into a mask costs
// one, and the tails need no scalar loop with masked loads and stores.
//
// Bit-exactness contract: every value is computed with the same IEEE operations, in the same order,
// as the generic kernels (lif.cpp: charge, reset, sg_grad, sigmoid_sg_f32, fwd_range, bwd_range), so
// all CPU paths give the same bits (tests/test_lif.py::test_cpu_isa_paths_agree). Only operations
// that round identically are swapped in: a float compare for the integer spike test, vmaxps for the
// bit-pattern clamp (both send NaN to the bound), a round-to-nearest instruction for the
// magic-constant rounding, and (AVX-512) vscalefps for the multiply by 2^n built from bits. No FMA.

#if defined(LASNN_SIMD_AVX512)
struct Vec {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int64_t W = 16;
  // The maskz_ forms of max/roundscale/scalef (all lanes) avoid gcc 12's false
  // -Wmaybe-uninitialized on the _mm512_undefined_ps() inside the unmasked ones; same instructions.
  static constexpr mask kAll = 0xFFFF;
  static reg set1(float f) { return _mm512_set1_ps(f); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static mask first(int64_t n) { return n >= W ? kAll : mask((1u << n) - 1u); }  // lanes [0, n)
  static reg load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_first(float* p, reg v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_maskz_max_ps(kAll, a, b); }  // NaN in either -> b
  static reg abs(reg a) { return _mm512_abs_ps(a); }
  static mask ge(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static mask lt(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static mask is_nan(reg a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static reg where(mask m, reg a) { return _mm512_maskz_mov_ps(m, a); }                // m ? a : +0
  static reg where_not(mask m, reg a) { return _mm512_maskz_mov_ps(_knot_mask16(m), a); }  // m ? +0 : a
  static reg blend(reg a, mask m, reg b) { return _mm512_mask_mov_ps(a, m, b); }       // m ? b : a
  static reg round_even(reg z) {
    return _mm512_maskz_roundscale_ps(kAll, z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static reg scale_pow2(reg p, reg n) { return _mm512_maskz_scalef_ps(kAll, p, n); }  // p * 2^n, n integral
};
#elif defined(LASNN_SIMD_AVX2)
struct Vec {
  using reg = __m256;
  using mask = __m256;  // all-ones / all-zeros lanes
  static constexpr int64_t W = 8;
  static reg set1(float f) { return _mm256_set1_ps(f); }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static __m256i first(int64_t n) {  // lanes [0, n)
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, W))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static reg load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first(n)); }
  static void store_first(float* p, reg v, int64_t n) { _mm256_maskstore_ps(p, first(n), v); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }  // NaN in either -> b
  static reg abs(reg a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static mask ge(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static mask lt(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static mask is_nan(reg a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static reg where(mask m, reg a) { return _mm256_and_ps(m, a); }
  static reg where_not(mask m, reg a) { return _mm256_andnot_ps(m, a); }
  static reg blend(reg a, mask m, reg b) { return _mm256_blendv_ps(a, b, m); }
  static reg round_even(reg z) { return _mm256_round_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg scale_pow2(reg p, reg n) {  // p * 2^n from the exponent bits, as sigmoid_sg_f32
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
#else
#error "lif_simd.h: define LASNN_SIMD_AVX512 or LASNN_SIMD_AVX2 before including it"
#endif

using VR = Vec::reg;

struct SimdConsts {
  VR inv_tau, vth, vr, alpha, one_minus_inv_tau, one, zero;
  VR neg_alpha, atan_scale, alpha_sq, half_over_alpha, two;
};

inline SimdConsts simd_consts(const LIFParams<float>& P) {
  SimdConsts c;
  c.inv_tau = Vec::set1(P.inv_tau);
  c.vth = Vec::set1(P.v_threshold);
  c.vr = Vec::set1(P.v_reset);
  c.alpha = Vec::set1(P.alpha);
  c.one_minus_inv_tau = Vec::set1(1.0f - P.inv_tau);
  c.one = Vec::set1(1.0f);
  c.zero = Vec::zero();
  c.neg_alpha = Vec::set1(-P.alpha);
  c.atan_scale = Vec::set1(1.5707963267948966f * P.alpha);
  c.alpha_sq = Vec::set1(P.alpha * P.alpha);
  c.half_over_alpha = Vec::set1(0.5f / P.alpha);
  c.two = Vec::set1(2.0f);
  return c;
}

// charge<SOFT, DECAY> of lif.cpp.
template <bool SOFT, bool DECAY>
inline VR charge_v(VR v, VR x, const SimdConsts& c) {
  const VR dv = SOFT ? v : Vec::sub(v, c.vr);  // v - 0 == v exactly (also for -0)
  if constexpr (DECAY) {
    return Vec::add(v, Vec::mul(Vec::sub(x, dv), c.inv_tau));
  } else {
    return Vec::add(Vec::sub(v, Vec::mul(dv, c.inv_tau)), x);
  }
}

// reset<SOFT> of lif.cpp with s = 0/1 (kept as arithmetic: s * v_reset + (1 - s) * h is NaN for
// h = +inf, exactly as the reference).
template <bool SOFT>
inline VR reset_v(VR h, VR s, const SimdConsts& c) {
  if constexpr (SOFT) {
    return Vec::sub(h, Vec::mul(s, c.vth));
  } else {
    return Vec::add(Vec::mul(s, c.vr), Vec::mul(Vec::sub(c.one, s), h));
  }
}

inline Vec::mask fires_v(VR h, const SimdConsts& c) { return Vec::ge(h, c.vth); }  // NaN: no spike

// sg_grad<SG, float> of lif.cpp on x = h - v_threshold.
template <int64_t SG>
inline VR sg_v(VR x, const SimdConsts& c) {
  if constexpr (SG == kAtan) {
    const VR z = Vec::mul(c.atan_scale, x);
    return Vec::div(c.alpha, Vec::mul(c.two, Vec::add(c.one, Vec::mul(z, z))));
  } else {
    VR g;
    if constexpr (SG == kSigmoid) {
      // sigmoid_sg_f32 of lif.cpp.
      VR y = Vec::mul(Vec::abs(x), c.neg_alpha);
      y = Vec::max(y, Vec::set1(kSigmoidClamp));  // NaN -> the clamp, as the bit test in lif.cpp
      const VR z = Vec::mul(y, Vec::set1(kLog2e));
      const VR n = Vec::round_even(z);
      const VR f = Vec::sub(z, n);
      VR p = Vec::set1(kExp2C5);
      p = Vec::add(Vec::mul(p, f), Vec::set1(kExp2C4));
      p = Vec::add(Vec::mul(p, f), Vec::set1(kExp2C3));
      p = Vec::add(Vec::mul(p, f), Vec::set1(kExp2C2));
      p = Vec::add(Vec::mul(p, f), Vec::set1(kExp2C1));
      p = Vec::add(Vec::mul(p, f), Vec::set1(kExp2C0));
      const VR e = Vec::scale_pow2(p, n);
      const VR t = Vec::add(c.one, e);
      g = Vec::mul(c.alpha, Vec::div(e, Vec::mul(t, t)));
    } else if constexpr (SG == kTriangle) {
      g = Vec::sub(c.alpha, Vec::mul(c.alpha_sq, Vec::abs(x)));
      g = Vec::max(g, c.zero);  // max(0, g); -0 cannot occur (a - b rounds to +0)
    } else {
      g = Vec::where(Vec::lt(Vec::abs(x), c.half_over_alpha), c.alpha);
    }
    return Vec::blend(g, Vec::is_nan(x), x);  // NaN in, NaN out
  }
}

// The recompute step of bwd_range: returns H_t and advances v.
template <bool SOFT, bool DECAY>
inline VR recompute_v(VR& v, VR x, const SimdConsts& c) {
  const VR h = charge_v<SOFT, DECAY>(v, x, c);
  v = reset_v<SOFT>(h, Vec::where(fires_v(h, c), c.one), c);
  return h;
}

// One reverse step of bwd_range (lasnn::lif_backward_step): returns grad_x_t and updates gv.
template <bool SOFT, bool DECAY, bool DETACH, int64_t SG>
inline VR reverse_v(VR h, VR gs, VR& gv, const SimdConsts& c) {
  const VR sg = sg_v<SG>(Vec::sub(h, c.vth), c);
  VR gh;
  if constexpr (SOFT && DETACH) {
    gh = Vec::add(Vec::mul(gs, sg), gv);  // gv * 1 == gv
  } else {
    VR dvdh;
    if constexpr (SOFT) {
      dvdh = Vec::sub(c.one, Vec::mul(c.vth, sg));
    } else {
      const VR one_minus_s = Vec::where_not(fires_v(h, c), c.one);
      dvdh = DETACH ? one_minus_s : Vec::add(one_minus_s, Vec::mul(Vec::sub(c.vr, h), sg));
    }
    gh = Vec::add(Vec::mul(gs, sg), Vec::mul(gv, dvdh));
  }
  gv = Vec::mul(gh, c.one_minus_inv_tau);
  return DECAY ? Vec::mul(gh, c.inv_tau) : gh;
}

constexpr int64_t kLanes = Vec::W;
static_assert(kPfChunk % kLanes == 0, "a prefetch chunk holds whole vectors");

// bwd_range of lif.cpp: the same blocks, scratch and prefetches. Block sizes are multiples of 16,
// so whole-vector loads and stores of the scratch rows stay inside them; the loads and stores of
// the tensors use masks for the last partial vector.
template <bool SOFT, bool DECAY, bool DETACH, int64_t SG>
void bwd_range_simd(const cpu_lif::BwdArgs<float, float>& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, N = a.N;
  const int64_t blk = bwd_block(T, sizeof(float));
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>((T + 2) * blk)]);
  float* __restrict__ hbuf = scratch.get();
  float* __restrict__ v = hbuf + T * blk;
  float* __restrict__ gv = v + blk;
  const SimdConsts c = simd_consts(a.P);
  for (int64_t n0 = begin; n0 < end; n0 += blk) {
    const int64_t nb = std::min(blk, end - n0);
    for (int64_t i = 0; i < nb; i += kLanes) {
      Vec::storeu(v + i, a.v0 != nullptr ? Vec::load_first(a.v0 + n0 + i, nb - i) : c.zero);
      Vec::storeu(gv + i, a.gvl != nullptr ? Vec::load_first(a.gvl + n0 + i, nb - i) : c.zero);
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict__ xt = a.x + t * N + n0;
      float* __restrict__ ht = hbuf + t * blk;
      const float* gx_pf = a.gx + t * N + n0;
      for (int64_t i0 = 0; i0 < nb; i0 += kPfChunk) {
        prefetch_chunk<float, 1>(gx_pf + i0);
        const int64_t i1 = std::min(nb, i0 + kPfChunk);
        for (int64_t i = i0; i < i1; i += kLanes) {
          VR vv = Vec::loadu(v + i);
          const VR x = i1 - i >= kLanes ? Vec::loadu(xt + i) : Vec::load_first(xt + i, i1 - i);
          Vec::storeu(ht + i, recompute_v<SOFT, DECAY>(vv, x, c));
          Vec::storeu(v + i, vv);
        }
      }
    }
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* __restrict__ ht = hbuf + t * blk;
      const float* __restrict__ gst = a.gs + t * N + n0;
      float* __restrict__ gxt = a.gx + t * N + n0;
      const int64_t nb_next = std::min(blk, end - n0 - nb);
      const float* x_pf = a.x + t * N + n0 + nb;
      const float* gs_pf = a.gs + t * N + n0 + nb;
      for (int64_t i0 = 0; i0 < nb; i0 += kPfChunk) {
        if (i0 < nb_next) {
          prefetch_chunk(x_pf + i0);
          prefetch_chunk(gs_pf + i0);
        }
        const int64_t i1 = std::min(nb, i0 + kPfChunk);
        if (i1 - i0 == kPfChunk) {
          for (int64_t i = i0; i < i1; i += kLanes) {
            VR g = Vec::loadu(gv + i);
            const VR gx = reverse_v<SOFT, DECAY, DETACH, SG>(Vec::loadu(ht + i), Vec::loadu(gst + i), g, c);
            Vec::storeu(gv + i, g);
            Vec::storeu(gxt + i, gx);
          }
        } else {
          for (int64_t i = i0; i < i1; i += kLanes) {
            VR g = Vec::loadu(gv + i);
            const VR gx =
                reverse_v<SOFT, DECAY, DETACH, SG>(Vec::loadu(ht + i), Vec::load_first(gst + i, i1 - i), g, c);
            Vec::storeu(gv + i, g);
            Vec::store_first(gxt + i, gx, i1 - i);
          }
        }
      }
    }
    for (int64_t i = 0; i < nb; i += kLanes) Vec::store_first(a.gv0 + n0 + i, Vec::loadu(gv + i), nb - i);
  }
}

// fwd_range of lif.cpp: the same blocks (about 14 instructions per vector here against ~20 with
// the integer tricks; with the data in L2 the generic forward was compute-bound).
template <bool SOFT, bool DECAY>
void fwd_range_simd(const cpu_lif::FwdArgs<float, float>& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, N = a.N;
  const SimdConsts c = simd_consts(a.P);
  const int64_t blk = fwd_block();
  alignas(64) float v[kFwdMaxBlock];
  for (int64_t n0 = begin; n0 < end; n0 += blk) {
    const int64_t nb = std::min(blk, end - n0);
    for (int64_t i = 0; i < nb; i += kLanes) {
      Vec::storeu(v + i, a.v0 != nullptr ? Vec::load_first(a.v0 + n0 + i, nb - i) : c.zero);
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict__ xt = a.x + t * N + n0;
      float* __restrict__ st = a.spikes + t * N + n0;
      int64_t i = 0;
      for (; i + kLanes <= nb; i += kLanes) {
        const VR h = charge_v<SOFT, DECAY>(Vec::loadu(v + i), Vec::loadu(xt + i), c);
        const VR s = Vec::where(fires_v(h, c), c.one);
        Vec::storeu(st + i, s);
        Vec::storeu(v + i, reset_v<SOFT>(h, s, c));
      }
      if (i < nb) {
        const VR h = charge_v<SOFT, DECAY>(Vec::loadu(v + i), Vec::load_first(xt + i, nb - i), c);
        const VR s = Vec::where(fires_v(h, c), c.one);
        Vec::store_first(st + i, s, nb - i);
        Vec::storeu(v + i, reset_v<SOFT>(h, s, c));
      }
    }
    for (int64_t i = 0; i < nb; i += kLanes) Vec::store_first(a.v_last + n0 + i, Vec::loadu(v + i), nb - i);
  }
}

inline void lif_fwd_f32_simd(const cpu_lif::FwdArgs<float, float>& a) {
  using Fn = void (*)(const cpu_lif::FwdArgs<float, float>&, int64_t, int64_t);
  Fn fn;
  if (a.P.soft_reset) {
    fn = a.P.decay_input ? &fwd_range_simd<true, true> : &fwd_range_simd<true, false>;
  } else {
    fn = a.P.decay_input ? &fwd_range_simd<false, true> : &fwd_range_simd<false, false>;
  }
  at::parallel_for(0, a.N, grain_for(a.T, fwd_block()), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

template <bool SOFT, bool DECAY, bool DETACH>
void (*pick_bwd_simd_sg(int64_t sg))(const cpu_lif::BwdArgs<float, float>&, int64_t, int64_t) {
  switch (sg) {
    case kSigmoid:
      return &bwd_range_simd<SOFT, DECAY, DETACH, kSigmoid>;
    case kAtan:
      return &bwd_range_simd<SOFT, DECAY, DETACH, kAtan>;
    case kTriangle:
      return &bwd_range_simd<SOFT, DECAY, DETACH, kTriangle>;
    default:
      return &bwd_range_simd<SOFT, DECAY, DETACH, kRect>;
  }
}

template <bool SOFT, bool DECAY>
void (*pick_bwd_simd_detach(bool detach, int64_t sg))(const cpu_lif::BwdArgs<float, float>&, int64_t, int64_t) {
  return detach ? pick_bwd_simd_sg<SOFT, DECAY, true>(sg) : pick_bwd_simd_sg<SOFT, DECAY, false>(sg);
}

inline void lif_bwd_f32_simd(const cpu_lif::BwdArgs<float, float>& a) {
  using Fn = void (*)(const cpu_lif::BwdArgs<float, float>&, int64_t, int64_t);
  const auto& P = a.P;
  Fn fn;
  if (P.soft_reset) {
    fn = P.decay_input ? pick_bwd_simd_detach<true, true>(P.detach_reset, P.surrogate)
                       : pick_bwd_simd_detach<true, false>(P.detach_reset, P.surrogate);
  } else {
    fn = P.decay_input ? pick_bwd_simd_detach<false, true>(P.detach_reset, P.surrogate)
                       : pick_bwd_simd_detach<false, false>(P.detach_reset, P.surrogate);
  }
  at::parallel_for(0, a.N, grain_for(a.T, bwd_block(a.T, sizeof(float))),
                   [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}
