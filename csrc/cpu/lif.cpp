// Fused multi-step LIF forward/backward on CPU: the time loop runs inside one call, the membrane
// of a block of neurons stays in a small stack array, and threads split the neurons (at::parallel_for,
// OpenMP). Math: csrc/lasnn_math.h (the same formulas as the CUDA kernels); oracle:
// lasnn/reference/lif.py.
//
// Speed notes (measured with benches/bench_lif.py and one-thread loops on an EPYC Zen 4):
// - The neuron flags (reset kind, decay_input, detach_reset, surrogate) are template parameters, so
//   every inner loop is branch-free straight-line code that gcc vectorises; with runtime flags the
//   backward was 3-10x slower (a switch per element defeats vectorisation).
// - The kernels are compiled three times: for the x86-64 baseline, AVX2 and AVX-512 (the last two
//   for fp32 and bf16 only), chosen at run time with __builtin_cpu_supports (LASNN_CPU_ISA=base|avx2
//   caps it), so the wheel runs everywhere while setup.py keeps plain -O3. All three give the same bits
//   (tests/test_lif.py::test_cpu_isa_paths_agree): no FMA anywhere (-ffp-contract=off).
// - The backward is compute-bound (one thread, T=4, sigmoid: the same ns per element-step with the
//   data in L2 as in DRAM). lasnn::sigmoid_surrogate's exp2 polynomial and -fno-trapping-math (which
//   lets gcc vectorise the compares) took it from 1.17 to 0.75 ns (AVX-512) and 1.43 to ~1.15 (AVX2);
//   hand-written AVX-512/AVX2 intrinsics, tried, were no faster than what gcc now emits.
#ifndef LASNN_LIF_CPU_BODY
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "lasnn_math.h"
#include "lif_launch.h"

namespace lasnn {
namespace cpu_lif {

// Arguments of one kernel call, flattened to raw pointers by the launcher. Pointers are typed by
// the template parameter at the call site; acc_t is float for fp16/bf16/fp32 and double for fp64.
template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* x;     // [T, N]
  const scalar_t* v0;    // [N] or nullptr (zeros)
  scalar_t* spikes;      // [T, N]
  scalar_t* v_last;      // [N]
  int64_t T, N;
  LIFParams<acc_t> P;
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const scalar_t* gs;    // [T, N], or one value per step at gs[t * gs_step_stride] (gs_row_broadcast)
  bool gs_row_broadcast;
  int64_t gs_step_stride;
  const scalar_t* gvl;   // [N] or nullptr (zeros)
  const scalar_t* x;     // [T, N]
  const scalar_t* v0;    // [N] or nullptr (zeros)
  scalar_t* gx;          // [T, N]
  scalar_t* gv0;         // [N]
  int64_t T, N;
  LIFParams<acc_t> P;
};

// LASNN_CPU_LIF_BLOCK=n (n >= 16) overrides the neurons per block of both kernels: a tuning knob for
// benchmarks on other CPUs, read once. 0 = the defaults below.
inline int64_t block_override() {
  static const int64_t b = [] {
    const char* s = std::getenv("LASNN_CPU_LIF_BLOCK");
    const long long v = s != nullptr ? std::atoll(s) : 0;
    return v >= 16 ? static_cast<int64_t>(std::min<long long>(v, 8192) / 16 * 16) : int64_t(0);
  }();
  return b;
}

}  // namespace cpu_lif
}  // namespace lasnn

// ---- The ISA-specific kernels: this file includes itself once per instruction set. ----
#define LASNN_LIF_CPU_BODY
namespace lasnn {
namespace cpu_lif {
namespace isa_base {
#include "lif.cpp"  // NOLINT(build/include): this file, see LASNN_LIF_CPU_BODY
}  // namespace isa_base
}  // namespace cpu_lif
}  // namespace lasnn

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__AVX2__)
#define LASNN_LIF_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace lasnn {
namespace cpu_lif {
namespace isa_avx2 {
#include "lif.cpp"  // NOLINT(build/include): this file, see LASNN_LIF_CPU_BODY
}  // namespace isa_avx2
}  // namespace cpu_lif
}  // namespace lasnn
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// AVX-512F brings FMA instructions and gcc contracts a*b+c by default in C++; keep the rounding
// of the baseline and AVX2 paths (tests/test_lif.py::test_cpu_isa_paths_agree checks bit equality).
#pragma GCC optimize("fp-contract=off")
namespace lasnn {
namespace cpu_lif {
namespace isa_avx512 {
#include "lif.cpp"  // NOLINT(build/include): this file, see LASNN_LIF_CPU_BODY
}  // namespace isa_avx512
}  // namespace cpu_lif
}  // namespace lasnn
#pragma GCC pop_options
#endif
#undef LASNN_LIF_CPU_BODY

namespace lasnn {
namespace {

using cpu_lif::BwdArgs;
using cpu_lif::FwdArgs;

enum class Isa { kBase, kAvx2, kAvx512 };

// LASNN_CPU_ISA=base|avx2|avx512 caps the instruction set (tests compare the paths; benchmarks can
// show what each buys). Read once: the choice must not change between a forward and its backward.
Isa pick_isa() {
#ifdef LASNN_LIF_X86_DISPATCH
  __builtin_cpu_init();
  Isa best = Isa::kBase;
  if (__builtin_cpu_supports("avx2")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
  const char* cap = std::getenv("LASNN_CPU_ISA");
  if (cap != nullptr) {
    if (std::strcmp(cap, "base") == 0) best = Isa::kBase;
    else if (std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) best = Isa::kAvx2;
  }
  return best;
#else
  return Isa::kBase;
#endif
}

Isa isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

}  // namespace

std::string cpu_lif_isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

namespace {

// Calls f(tag) with the IsaTag of the build that runs scalar_t here. fp32 and bf16 (CPU autocast)
// have AVX builds; each extra (ISA, dtype) pair adds ~40 template instances (~20 s on CI's 2 cores).
// Measured, one thread, T=4, N=2^16, bf16 sigmoid backward: base 2.96, AVX2 1.34, AVX-512 0.89 ns
// per element-step. The generic lambda keeps the AVX instances of other dtypes from being compiled.
template <typename scalar_t, typename F>
void with_isa(F&& f) {
#ifdef LASNN_LIF_X86_DISPATCH
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    switch (isa()) {
      case Isa::kAvx512:
        f(cpu_lif::isa_avx512::IsaTag{});
        return;
      case Isa::kAvx2:
        f(cpu_lif::isa_avx2::IsaTag{});
        return;
      default:
        break;
    }
  }
#endif
  f(cpu_lif::isa_base::IsaTag{});
}

std::tuple<at::Tensor, at::Tensor> lif_fwd_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& v_init_,
                                               double tau, double v_threshold, double v_reset, bool soft_reset,
                                               bool decay_input) {
  check_lif_inputs(x_, v_init_, tau, v_threshold, v_reset, 1.0, "lasnn::lif_fwd");
  TORCH_CHECK_VALUE(x_.device().is_cpu(), "lasnn::lif_fwd (cpu): x must be on CPU");
  const LifFwdTensors t = prepare_lif_fwd(x_, v_init_);
  if (t.done) return {t.spikes, t.v_last};
  const at::Tensor &x = t.x, &v_init = t.v_init, &spikes = t.spikes, &v_last = t.v_last;
  const int64_t T = x.size(0), N = x.size(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdArgs<scalar_t, acc_t> a;
    a.x = x.data_ptr<scalar_t>();
    a.v0 = v_init.defined() ? v_init.data_ptr<scalar_t>() : nullptr;
    a.spikes = spikes.data_ptr<scalar_t>();
    a.v_last = v_last.data_ptr<scalar_t>();
    a.T = T;
    a.N = N;
    a.P = make_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input, false, 0, 1.0);
    with_isa<scalar_t>([&](auto tag) { lif_fwd(tag, a); });
  });
  return {spikes, v_last};
}

// Backward from the saved input: for a block of neurons, recompute H_t into a scratch buffer that
// stays in cache (T x block), then walk time in reverse. Reads x and grad_spikes once and writes
// grad_x once: the minimum traffic for this op.
std::tuple<at::Tensor, at::Tensor> lif_bwd_cpu(const at::Tensor& grad_spikes_, const std::optional<at::Tensor>& grad_v_last_,
                                               const at::Tensor& x_, const std::optional<at::Tensor>& v_init_,
                                               double tau, double v_threshold, double v_reset, bool soft_reset,
                                               bool decay_input, bool detach_reset, int64_t surrogate,
                                               double alpha) {
  check_lif_inputs(x_, v_init_, tau, v_threshold, v_reset, alpha, "lasnn::lif_bwd");
  TORCH_CHECK_VALUE(x_.device().is_cpu(), "lasnn::lif_bwd (cpu): x must be on CPU");
  check_lif_bwd_grads(grad_spikes_, grad_v_last_, x_, surrogate);
  const LifBwdTensors t = prepare_lif_bwd(grad_spikes_, grad_v_last_, x_, v_init_, /*row_broadcast=*/true);
  if (t.done) return {t.grad_x, t.grad_v_init};
  const at::Tensor &x = t.x, &gs = t.gs, &v_init = t.v_init, &gvl = t.gvl;
  const at::Tensor &grad_x = t.grad_x, &grad_v_init = t.grad_v_init;
  const int64_t T = x.size(0), N = x.size(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BwdArgs<scalar_t, acc_t> a;
    a.gs = gs.data_ptr<scalar_t>();
    a.gs_row_broadcast = t.gs_row_broadcast;
    a.gs_step_stride = t.gs_step_stride;
    a.gvl = gvl.defined() ? gvl.data_ptr<scalar_t>() : nullptr;
    a.x = x.data_ptr<scalar_t>();
    a.v0 = v_init.defined() ? v_init.data_ptr<scalar_t>() : nullptr;
    a.gx = grad_x.data_ptr<scalar_t>();
    a.gv0 = grad_v_init.data_ptr<scalar_t>();
    a.T = T;
    a.N = N;
    a.P = make_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input, detach_reset, surrogate, alpha);
    with_isa<scalar_t>([&](auto tag) { lif_bwd(tag, a); });
  });
  return {grad_x, grad_v_init};
}

}  // namespace

TORCH_LIBRARY_IMPL(lasnn, CPU, m) {
  m.impl("lif_fwd", &lif_fwd_cpu);
  m.impl("lif_bwd", &lif_bwd_cpu);
}

}  // namespace lasnn

#else  // LASNN_LIF_CPU_BODY: the kernels, compiled once per instruction set (namespace set by the includer).

// Names this instruction set's build: the launcher calls lif_fwd(tag, args) / lif_bwd(tag, args) and
// argument-dependent lookup picks the namespace (see with_isa).
struct IsaTag {};

// The formulas are lasnn_math.h's compile-time-flag forms (charge, spike, reset, backward_step).
// setup.py compiles with -fno-trapping-math: under gcc's default -ftrapping-math a compare such as
// `h >= v_threshold ? 1 : 0` may raise FP exceptions, so gcc refuses to if-convert it and the loop
// stays scalar with a data-dependent branch (measured: 10-20x slower on random spikes).

template <typename acc_t, typename scalar_t>
inline acc_t load(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

// dst[0..n) = src[0..n) in acc_t, or zeros when src is null (an optional v_init / grad_v_last).
template <typename acc_t, typename scalar_t>
inline void load_or_zero(acc_t* __restrict__ dst, const scalar_t* src, int64_t n) {
  if (src != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = load<acc_t>(src, i);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = acc_t(0);
  }
}

// Neurons per block: the membrane (and in the backward T x block charges) stay in L1/L2 while the
// T rows of x stream through. Measured on an EPYC (Zen 4) with LASNN_CPU_LIF_BLOCK, T=4, N=2^20,
// one thread: 64 -> 1.8 ms, 256 -> 1.1, 1024 -> 1.0, 4096 -> 2.3 (forward); the backward was flat
// was worse at 64-256 (short segments defeat the hardware prefetcher) and at 4096 (see below).
constexpr int64_t kFwdBlock = 1024;
constexpr int64_t kFwdMaxBlock = 8192;

inline int64_t fwd_block() { return cpu_lif::block_override() ? cpu_lif::block_override() : kFwdBlock; }

template <typename scalar_t, typename acc_t, bool SOFT, bool DECAY>
void fwd_range(const cpu_lif::FwdArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, N = a.N;
  const acc_t inv_tau = a.P.inv_tau, vth = a.P.v_threshold, vr = a.P.v_reset;
  const int64_t blk = fwd_block();
  alignas(64) acc_t v[kFwdMaxBlock];
  for (int64_t n0 = begin; n0 < end; n0 += blk) {
    const int64_t nb = std::min(blk, end - n0);
    load_or_zero(v, a.v0 != nullptr ? a.v0 + n0 : nullptr, nb);
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* __restrict__ xt = a.x + t * N + n0;
      scalar_t* __restrict__ st = a.spikes + t * N + n0;
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t h = charge<SOFT, DECAY>(v[i], load<acc_t>(xt, i), inv_tau, vr);
        const acc_t s = spike(h, vth);
        st[i] = static_cast<scalar_t>(s);
        v[i] = reset<SOFT>(h, s, vth, vr);
      }
    }
    for (int64_t i = 0; i < nb; ++i) a.v_last[n0 + i] = static_cast<scalar_t>(v[i]);
  }
}

// Grain: at least ~16k element-steps per task, so small layers are not split into tiny OpenMP chunks.
inline int64_t grain_for(int64_t T, int64_t block) {
  return std::max<int64_t>(block, (int64_t(1) << 14) / std::max<int64_t>(T, 1));
}

template <typename scalar_t, typename acc_t>
void lif_fwd(IsaTag, const cpu_lif::FwdArgs<scalar_t, acc_t>& a) {
  using Fn = void (*)(const cpu_lif::FwdArgs<scalar_t, acc_t>&, int64_t, int64_t);
  Fn fn;
  if (a.P.soft_reset) {
    fn = a.P.decay_input ? &fwd_range<scalar_t, acc_t, true, true> : &fwd_range<scalar_t, acc_t, true, false>;
  } else {
    fn = a.P.decay_input ? &fwd_range<scalar_t, acc_t, false, true> : &fwd_range<scalar_t, acc_t, false, false>;
  }
  at::parallel_for(0, a.N, grain_for(a.T, fwd_block()), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

// Scratch for the recomputed charges: at most 32 KiB per thread, block = 64..1024 neurons. The
// reverse pass touches the charges, the membrane gradient and two streamed rows per step; keeping
// them in L1 matters more than long row segments (measured, one thread, T=4, N=2^20: backward
// 6.6-9 ms with 1024-neuron blocks vs 12-14 ms with 4096).
constexpr int64_t kBwdScratchBytes = 32 * 1024;
constexpr int64_t kBwdMaxBlock = 1024;

inline int64_t bwd_block(int64_t T, int64_t acc_size) {
  if (cpu_lif::block_override()) return cpu_lif::block_override();
  return std::max<int64_t>(64, std::min<int64_t>(kBwdMaxBlock, kBwdScratchBytes / acc_size / T / 64 * 64));
}

// Software prefetch in chunks of 64 elements (4 cache lines of fp32), interleaved with the compute
// so the loads overlap it; into L2 (locality 2), since L1 holds the scratch.
constexpr int64_t kPfChunk = 64;
template <typename scalar_t, int RW = 0>
inline void prefetch_chunk(const scalar_t* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < kPfChunk * static_cast<int64_t>(sizeof(scalar_t)); off += 64)
    __builtin_prefetch(c + off, RW, 2);
}

template <typename scalar_t, typename acc_t, bool SOFT, bool DECAY, bool DETACH, int64_t SG>
void bwd_range(const cpu_lif::BwdArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, N = a.N;
  const int64_t blk = bwd_block(T, sizeof(acc_t));
  // One heap buffer per task (not per block): [T * blk] charges, then v and gv.
  std::unique_ptr<acc_t[]> scratch(new acc_t[static_cast<size_t>((T + 2) * blk)]);
  // A broadcast grad_spikes row is spread over one block-long row here (in L1), so the inner loop is the
  // same as for a full [T, N] gradient and nothing of size [T, N] is ever read or written for it.
  std::unique_ptr<scalar_t[]> gs_row(a.gs_row_broadcast ? new scalar_t[static_cast<size_t>(blk)] : nullptr);
  acc_t* __restrict__ hbuf = scratch.get();
  acc_t* __restrict__ v = hbuf + T * blk;
  acc_t* __restrict__ gv = v + blk;
  const acc_t inv_tau = a.P.inv_tau, vth = a.P.v_threshold, vr = a.P.v_reset, alpha = a.P.alpha;
  for (int64_t n0 = begin; n0 < end; n0 += blk) {
    const int64_t nb = std::min(blk, end - n0);
    load_or_zero(v, a.v0 != nullptr ? a.v0 + n0 : nullptr, nb);
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* __restrict__ xt = a.x + t * N + n0;
      acc_t* __restrict__ ht = hbuf + t * blk;
      // Fetch this block's grad_x row (for writing) into L2 while x streams: the reverse pass
      // below stores to it, and a store miss stalls like a load miss (write-allocate).
      const scalar_t* gx_pf = a.gx + t * N + n0;
      for (int64_t i0 = 0; i0 < nb; i0 += kPfChunk) {
        prefetch_chunk<scalar_t, 1>(gx_pf + i0);
        const int64_t i1 = std::min(nb, i0 + kPfChunk);
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t h = charge<SOFT, DECAY>(v[i], load<acc_t>(xt, i), inv_tau, vr);
          ht[i] = h;
          v[i] = reset<SOFT>(h, spike(h, vth), vth, vr);
        }
      }
    }
    load_or_zero(gv, a.gvl != nullptr ? a.gvl + n0 : nullptr, nb);
    for (int64_t t = T - 1; t >= 0; --t) {
      const acc_t* __restrict__ ht = hbuf + t * blk;
      if (a.gs_row_broadcast) std::fill(gs_row.get(), gs_row.get() + nb, a.gs[t * a.gs_step_stride]);
      const scalar_t* __restrict__ gst = a.gs_row_broadcast ? gs_row.get() : a.gs + t * N + n0;
      scalar_t* __restrict__ gxt = a.gx + t * N + n0;
      // Fetch the next block's x and grad_spikes rows into L2 while this one is computed: each row
      // segment is a separate page the hardware prefetcher would start cold (measured: the x loads
      // of the recompute loop and the grad_spikes loads here were the hottest stalls).
      const int64_t nb_next = std::min(blk, end - n0 - nb);
      const scalar_t* x_pf = a.x + t * N + n0 + nb;
      const scalar_t* gs_pf = a.gs_row_broadcast ? nullptr : a.gs + t * N + n0 + nb;
      for (int64_t i0 = 0; i0 < nb; i0 += kPfChunk) {
        if (i0 < nb_next) {
          prefetch_chunk(x_pf + i0);
          if (!a.gs_row_broadcast) prefetch_chunk(gs_pf + i0);
        }
        const int64_t i1 = std::min(nb, i0 + kPfChunk);
        for (int64_t i = i0; i < i1; ++i) {
          acc_t g = gv[i];
          const acc_t gx =
              backward_step<SOFT, DECAY, DETACH, SG>(ht[i], load<acc_t>(gst, i), &g, inv_tau, vth, vr, alpha);
          gv[i] = g;
          gxt[i] = static_cast<scalar_t>(gx);
        }
      }
    }
    for (int64_t i = 0; i < nb; ++i) a.gv0[n0 + i] = static_cast<scalar_t>(gv[i]);
  }
}

template <typename scalar_t, typename acc_t, bool SOFT, bool DECAY, bool DETACH>
void (*pick_bwd_sg(int64_t sg))(const cpu_lif::BwdArgs<scalar_t, acc_t>&, int64_t, int64_t) {
  switch (sg) {
    case kSigmoid:
      return &bwd_range<scalar_t, acc_t, SOFT, DECAY, DETACH, kSigmoid>;
    case kAtan:
      return &bwd_range<scalar_t, acc_t, SOFT, DECAY, DETACH, kAtan>;
    case kTriangle:
      return &bwd_range<scalar_t, acc_t, SOFT, DECAY, DETACH, kTriangle>;
    default:
      return &bwd_range<scalar_t, acc_t, SOFT, DECAY, DETACH, kRect>;
  }
}

template <typename scalar_t, typename acc_t, bool SOFT, bool DECAY>
void (*pick_bwd_detach(bool detach, int64_t sg))(const cpu_lif::BwdArgs<scalar_t, acc_t>&, int64_t, int64_t) {
  return detach ? pick_bwd_sg<scalar_t, acc_t, SOFT, DECAY, true>(sg)
                : pick_bwd_sg<scalar_t, acc_t, SOFT, DECAY, false>(sg);
}

template <typename scalar_t, typename acc_t>
void lif_bwd(IsaTag, const cpu_lif::BwdArgs<scalar_t, acc_t>& a) {
  using Fn = void (*)(const cpu_lif::BwdArgs<scalar_t, acc_t>&, int64_t, int64_t);
  const auto& P = a.P;
  Fn fn;
  if (P.soft_reset) {
    fn = P.decay_input ? pick_bwd_detach<scalar_t, acc_t, true, true>(P.detach_reset, P.surrogate)
                       : pick_bwd_detach<scalar_t, acc_t, true, false>(P.detach_reset, P.surrogate);
  } else {
    fn = P.decay_input ? pick_bwd_detach<scalar_t, acc_t, false, true>(P.detach_reset, P.surrogate)
                       : pick_bwd_detach<scalar_t, acc_t, false, false>(P.detach_reset, P.surrogate);
  }
  at::parallel_for(0, a.N, grain_for(a.T, bwd_block(a.T, sizeof(acc_t))),
                   [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

#endif  // LASNN_LIF_CPU_BODY
