// The fp32 LIF backward written with AVX-512 intrinsics: included by csrc/cpu/lif.cpp inside
// namespace lasnn::cpu_lif::isa_avx512, after the generic kernels, under
// `#pragma GCC target("avx512f,...")` and `fp-contract=off`.
//
// Why a hand-written kernel: the backward is compute-bound (measured on Zen 4, one thread: 1.2 ns
// per element-step whether the data sits in L2 or in DRAM). gcc vectorises the generic kernels only
// through integer bit tricks (a float compare stays scalar under -ftrapping-math, see lif.cpp), so
// every spike test, clamp and NaN check costs 3-5 instructions where AVX-512 needs one compare into
// a mask register; and the tail needs no scalar loop with masked loads and stores.
//
// Bit-exactness contract: every value is computed with the same IEEE operations, in the same order,
// as the generic kernels (lif.cpp: charge, reset, sg_grad, sigmoid_sg_f32, bwd_range), so all CPU
// paths give the same bits. Only operations that round identically are swapped in: a compare into a
// mask for the integer spike test, vmaxps for the bit-pattern clamp (both send NaN to the bound),
// vrndscaleps for the magic-constant rounding, vscalefps for the multiply by 2^n built from bits.
// No FMA: fp-contract=off keeps a*b+c as two roundings, like the baseline x86-64 path.

// All-lanes mask: the maskz_ forms of max/roundscale/scalef avoid gcc 12's false
// -Wmaybe-uninitialized on the _mm512_undefined_ps() inside the unmasked ones; same instructions.
constexpr __mmask16 kAll = 0xFFFF;

struct Avx512Consts {
  __m512 inv_tau, vth, vr, alpha, one_minus_inv_tau, one, zero;
  __m512 neg_alpha, atan_scale, alpha_sq, half_over_alpha, two;
};

inline Avx512Consts avx512_consts(const LIFParams<float>& P) {
  Avx512Consts c;
  c.inv_tau = _mm512_set1_ps(P.inv_tau);
  c.vth = _mm512_set1_ps(P.v_threshold);
  c.vr = _mm512_set1_ps(P.v_reset);
  c.alpha = _mm512_set1_ps(P.alpha);
  c.one_minus_inv_tau = _mm512_set1_ps(1.0f - P.inv_tau);
  c.one = _mm512_set1_ps(1.0f);
  c.zero = _mm512_setzero_ps();
  c.neg_alpha = _mm512_set1_ps(-P.alpha);
  c.atan_scale = _mm512_set1_ps(1.5707963267948966f * P.alpha);
  c.alpha_sq = _mm512_set1_ps(P.alpha * P.alpha);
  c.half_over_alpha = _mm512_set1_ps(0.5f / P.alpha);
  c.two = _mm512_set1_ps(2.0f);
  return c;
}

inline __m512 abs16(__m512 x) { return _mm512_abs_ps(x); }

// charge<SOFT, DECAY> of lif.cpp.
template <bool SOFT, bool DECAY>
inline __m512 charge16(__m512 v, __m512 x, const Avx512Consts& c) {
  const __m512 dv = SOFT ? v : _mm512_sub_ps(v, c.vr);  // v - 0 == v exactly (also for -0)
  if constexpr (DECAY) {
    return _mm512_add_ps(v, _mm512_mul_ps(_mm512_sub_ps(x, dv), c.inv_tau));
  } else {
    return _mm512_add_ps(_mm512_sub_ps(v, _mm512_mul_ps(dv, c.inv_tau)), x);
  }
}

// reset<SOFT> of lif.cpp with s = 0/1 (kept as arithmetic: s * v_reset + (1 - s) * h is NaN for
// h = +inf, exactly as the reference).
template <bool SOFT>
inline __m512 reset16(__m512 h, __m512 s, const Avx512Consts& c) {
  if constexpr (SOFT) {
    return _mm512_sub_ps(h, _mm512_mul_ps(s, c.vth));
  } else {
    return _mm512_add_ps(_mm512_mul_ps(s, c.vr), _mm512_mul_ps(_mm512_sub_ps(c.one, s), h));
  }
}

inline __mmask16 fires16(__m512 h, const Avx512Consts& c) { return _mm512_cmp_ps_mask(h, c.vth, _CMP_GE_OQ); }

// sg_grad<SG, float> of lif.cpp on x = h - v_threshold.
template <int64_t SG>
inline __m512 sg16(__m512 x, const Avx512Consts& c) {
  if constexpr (SG == kAtan) {
    const __m512 z = _mm512_mul_ps(c.atan_scale, x);
    return _mm512_div_ps(c.alpha, _mm512_mul_ps(c.two, _mm512_add_ps(c.one, _mm512_mul_ps(z, z))));
  } else {
    __m512 g;
    if constexpr (SG == kSigmoid) {
      // sigmoid_sg_f32 of lif.cpp.
      __m512 y = _mm512_mul_ps(abs16(x), c.neg_alpha);
      y = _mm512_maskz_max_ps(kAll, y, _mm512_set1_ps(kSigmoidClamp));  // NaN -> the second operand
      const __m512 z = _mm512_mul_ps(y, _mm512_set1_ps(kLog2e));
      const __m512 n = _mm512_maskz_roundscale_ps(kAll, z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 f = _mm512_sub_ps(z, n);
      __m512 p = _mm512_set1_ps(kExp2C5);
      p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(kExp2C4));
      p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(kExp2C3));
      p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(kExp2C2));
      p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(kExp2C1));
      p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(kExp2C0));
      const __m512 e = _mm512_maskz_scalef_ps(kAll, p, n);
      const __m512 t = _mm512_add_ps(c.one, e);
      g = _mm512_mul_ps(c.alpha, _mm512_div_ps(e, _mm512_mul_ps(t, t)));
    } else if constexpr (SG == kTriangle) {
      g = _mm512_sub_ps(c.alpha, _mm512_mul_ps(c.alpha_sq, abs16(x)));
      g = _mm512_maskz_max_ps(kAll, g, c.zero);  // max(0, g); -0 cannot occur (a - b rounds to +0)
    } else {
      g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(abs16(x), c.half_over_alpha, _CMP_LT_OQ), c.alpha);
    }
    return _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // NaN in, NaN out
  }
}

// The recompute step of bwd_range: returns H_t and advances v.
template <bool SOFT, bool DECAY>
inline __m512 recompute16(__m512& v, __m512 x, const Avx512Consts& c) {
  const __m512 h = charge16<SOFT, DECAY>(v, x, c);
  v = reset16<SOFT>(h, _mm512_maskz_mov_ps(fires16(h, c), c.one), c);
  return h;
}

// One reverse step of bwd_range (lasnn::lif_backward_step): returns grad_x_t and updates gv.
template <bool SOFT, bool DECAY, bool DETACH, int64_t SG>
inline __m512 reverse16(__m512 h, __m512 gs, __m512& gv, const Avx512Consts& c) {
  const __m512 sg = sg16<SG>(_mm512_sub_ps(h, c.vth), c);
  __m512 gh;
  if constexpr (SOFT && DETACH) {
    gh = _mm512_add_ps(_mm512_mul_ps(gs, sg), gv);  // gv * 1 == gv
  } else {
    __m512 dvdh;
    if constexpr (SOFT) {
      dvdh = _mm512_sub_ps(c.one, _mm512_mul_ps(c.vth, sg));
    } else {
      const __m512 one_minus_s = _mm512_maskz_mov_ps(_knot_mask16(fires16(h, c)), c.one);
      dvdh = DETACH ? one_minus_s : _mm512_add_ps(one_minus_s, _mm512_mul_ps(_mm512_sub_ps(c.vr, h), sg));
    }
    gh = _mm512_add_ps(_mm512_mul_ps(gs, sg), _mm512_mul_ps(gv, dvdh));
  }
  gv = _mm512_mul_ps(gh, c.one_minus_inv_tau);
  return DECAY ? _mm512_mul_ps(gh, c.inv_tau) : gh;
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// bwd_range of lif.cpp for fp32 with AVX-512: the same blocks, scratch and prefetches.
template <bool SOFT, bool DECAY, bool DETACH, int64_t SG>
void bwd_range_avx512(const cpu_lif::BwdArgs<float, float>& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, N = a.N;
  const int64_t blk = bwd_block(T, sizeof(float));
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>((T + 2) * blk) + 16]);
  float* __restrict__ hbuf = scratch.get();
  float* __restrict__ v = hbuf + T * blk;
  float* __restrict__ gv = v + blk;
  const Avx512Consts c = avx512_consts(a.P);
  for (int64_t n0 = begin; n0 < end; n0 += blk) {
    const int64_t nb = std::min(blk, end - n0);
    for (int64_t i = 0; i < nb; i += 16) {
      const __mmask16 m = tail_mask(nb - i);
      _mm512_storeu_ps(v + i, a.v0 != nullptr ? _mm512_maskz_loadu_ps(m, a.v0 + n0 + i) : c.zero);
      _mm512_storeu_ps(gv + i, a.gvl != nullptr ? _mm512_maskz_loadu_ps(m, a.gvl + n0 + i) : c.zero);
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict__ xt = a.x + t * N + n0;
      float* __restrict__ ht = hbuf + t * blk;
      const float* gx_pf = a.gx + t * N + n0;
      for (int64_t i0 = 0; i0 < nb; i0 += kPfChunk) {
        prefetch_chunk<float, 1>(gx_pf + i0);
        const int64_t i1 = std::min(nb, i0 + kPfChunk);
        for (int64_t i = i0; i < i1; i += 16) {
          __m512 vv = _mm512_loadu_ps(v + i);
          const __m512 x = i1 - i >= 16 ? _mm512_loadu_ps(xt + i) : _mm512_maskz_loadu_ps(tail_mask(i1 - i), xt + i);
          _mm512_storeu_ps(ht + i, recompute16<SOFT, DECAY>(vv, x, c));
          _mm512_storeu_ps(v + i, vv);
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
          for (int64_t i = i0; i < i1; i += 16) {
            __m512 g = _mm512_loadu_ps(gv + i);
            const __m512 gx = reverse16<SOFT, DECAY, DETACH, SG>(_mm512_loadu_ps(ht + i), _mm512_loadu_ps(gst + i), g, c);
            _mm512_storeu_ps(gv + i, g);
            _mm512_storeu_ps(gxt + i, gx);
          }
        } else {
          for (int64_t i = i0; i < i1; i += 16) {
            const __mmask16 m = tail_mask(i1 - i);
            __m512 g = _mm512_loadu_ps(gv + i);
            const __m512 gx =
                reverse16<SOFT, DECAY, DETACH, SG>(_mm512_loadu_ps(ht + i), _mm512_maskz_loadu_ps(m, gst + i), g, c);
            _mm512_storeu_ps(gv + i, g);
            _mm512_mask_storeu_ps(gxt + i, m, gx);
          }
        }
      }
    }
    for (int64_t i = 0; i < nb; i += 16) _mm512_mask_storeu_ps(a.gv0 + n0 + i, tail_mask(nb - i), _mm512_loadu_ps(gv + i));
  }
}

// fwd_range of lif.cpp for fp32 with AVX-512 (the same blocks; the forward is ~14 instructions
// per 16 neurons here against ~20 with the integer tricks, and in L2 it was compute-bound).
template <bool SOFT, bool DECAY>
void fwd_range_avx512(const cpu_lif::FwdArgs<float, float>& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, N = a.N;
  const Avx512Consts c = avx512_consts(a.P);
  const int64_t blk = fwd_block();
  alignas(64) float v[kFwdMaxBlock];
  for (int64_t n0 = begin; n0 < end; n0 += blk) {
    const int64_t nb = std::min(blk, end - n0);
    for (int64_t i = 0; i < nb; i += 16) {
      _mm512_store_ps(v + i, a.v0 != nullptr ? _mm512_maskz_loadu_ps(tail_mask(nb - i), a.v0 + n0 + i) : c.zero);
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* __restrict__ xt = a.x + t * N + n0;
      float* __restrict__ st = a.spikes + t * N + n0;
      int64_t i = 0;
      for (; i + 16 <= nb; i += 16) {
        const __m512 h = charge16<SOFT, DECAY>(_mm512_load_ps(v + i), _mm512_loadu_ps(xt + i), c);
        const __m512 s = _mm512_maskz_mov_ps(fires16(h, c), c.one);
        _mm512_storeu_ps(st + i, s);
        _mm512_store_ps(v + i, reset16<SOFT>(h, s, c));
      }
      if (i < nb) {
        const __mmask16 m = tail_mask(nb - i);
        const __m512 h = charge16<SOFT, DECAY>(_mm512_load_ps(v + i), _mm512_maskz_loadu_ps(m, xt + i), c);
        const __m512 s = _mm512_maskz_mov_ps(fires16(h, c), c.one);
        _mm512_mask_storeu_ps(st + i, m, s);
        _mm512_store_ps(v + i, reset16<SOFT>(h, s, c));
      }
    }
    for (int64_t i = 0; i < nb; i += 16) _mm512_mask_storeu_ps(a.v_last + n0 + i, tail_mask(nb - i), _mm512_load_ps(v + i));
  }
}

inline void lif_fwd_f32_avx512(const cpu_lif::FwdArgs<float, float>& a) {
  using Fn = void (*)(const cpu_lif::FwdArgs<float, float>&, int64_t, int64_t);
  Fn fn;
  if (a.P.soft_reset) {
    fn = a.P.decay_input ? &fwd_range_avx512<true, true> : &fwd_range_avx512<true, false>;
  } else {
    fn = a.P.decay_input ? &fwd_range_avx512<false, true> : &fwd_range_avx512<false, false>;
  }
  at::parallel_for(0, a.N, grain_for(a.T, fwd_block()), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

template <bool SOFT, bool DECAY, bool DETACH>
void (*pick_bwd_avx512_sg(int64_t sg))(const cpu_lif::BwdArgs<float, float>&, int64_t, int64_t) {
  switch (sg) {
    case kSigmoid:
      return &bwd_range_avx512<SOFT, DECAY, DETACH, kSigmoid>;
    case kAtan:
      return &bwd_range_avx512<SOFT, DECAY, DETACH, kAtan>;
    case kTriangle:
      return &bwd_range_avx512<SOFT, DECAY, DETACH, kTriangle>;
    default:
      return &bwd_range_avx512<SOFT, DECAY, DETACH, kRect>;
  }
}

template <bool SOFT, bool DECAY>
void (*pick_bwd_avx512_detach(bool detach, int64_t sg))(const cpu_lif::BwdArgs<float, float>&, int64_t, int64_t) {
  return detach ? pick_bwd_avx512_sg<SOFT, DECAY, true>(sg) : pick_bwd_avx512_sg<SOFT, DECAY, false>(sg);
}

inline void lif_bwd_f32_avx512(const cpu_lif::BwdArgs<float, float>& a) {
  using Fn = void (*)(const cpu_lif::BwdArgs<float, float>&, int64_t, int64_t);
  const auto& P = a.P;
  Fn fn;
  if (P.soft_reset) {
    fn = P.decay_input ? pick_bwd_avx512_detach<true, true>(P.detach_reset, P.surrogate)
                       : pick_bwd_avx512_detach<true, false>(P.detach_reset, P.surrogate);
  } else {
    fn = P.decay_input ? pick_bwd_avx512_detach<false, true>(P.detach_reset, P.surrogate)
                       : pick_bwd_avx512_detach<false, false>(P.detach_reset, P.surrogate);
  }
  at::parallel_for(0, a.N, grain_for(a.T, bwd_block(a.T, sizeof(float))),
                   [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}
