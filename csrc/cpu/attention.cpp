// Fused raw attention map (forward) and its gradient (backward) on CPU.
//
//   feat [T, B, C, S] -> time_mean: m[b, s]    = 1/C sum_c |1/T sum_t feat[t, b, c, s]|^p
//                        per step:  m[t, b, s] = 1/C sum_c |feat[t, b, c, s]|^p
//
// The student features are read once and nothing of their size is allocated: threads split
// (row, spatial tile) work items (at::parallel_for, OpenMP); each item loops over C (and T) with a
// tile of accumulators in a stack array, so the inner loops run over contiguous memory and gcc
// vectorises them. The per-step mode is the time-mean mode with T' = 1 over R = T*B rows, since
// [T, B, C, S] contiguous is [T*B, C, S]. Accumulation in fp32 (fp64 for fp64); the map is returned
// in that accumulation type. The backward reads feat and grad_map once and writes grad_feat once:
//   grad_feat[t, b, c, s] = grad_map[b, s] / (C T) * p |m_c|^(p-1) sign(m_c)     (m_c = mean_t feat)
//                         = grad_map[t, b, s] / C * p |feat|^(p-1) sign(feat)     (per step)
// In the time-mean mode the gradient is the same for every t: one [1, B, C, S] slab is written and
// returned expanded to [T, B, C, S] (stride 0 over T), a quarter of the writes at T = 4.
// Math: csrc/attention_math.h; argument checks: csrc/attention_launch.h (shared with CUDA);
// oracle: lasnn/reference/attention.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_launch.h"
#include "attention_math.h"

namespace lasnn {
namespace {

// Spatial tile: up to kTile accumulators (8-16 KiB, L1) while the C*T rows of the tile stream through.
// Long tiles keep each run of reads long (a whole row of S when it fits: one sequential sweep of the
// [C, S] slab); shorter ones only when the rows alone would leave threads idle.
constexpr int64_t kTile = 2048;

int64_t pick_tile(int64_t R, int64_t S) {
  const int64_t want_items = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t splits = std::max<int64_t>(1, (want_items + R - 1) / std::max<int64_t>(R, 1));
  int64_t tile = (S + splits - 1) / splits;
  tile = (tile + 15) / 16 * 16;  // whole vectors
  return std::max<int64_t>(16, std::min(kTile, tile));
}

// How fwd_impl / bwd_impl split R rows x S positions into (row, tile) work items for the threads.
struct TilePlan {
  int64_t tile, ntiles, grain;
};

TilePlan plan_tiles(int64_t R, int64_t TT, int64_t C, int64_t S) {
  TilePlan plan;
  plan.tile = pick_tile(R, S);
  plan.ntiles = (S + plan.tile - 1) / plan.tile;
  // At least ~32k element reads per task, so small maps are not cut into tiny OpenMP chunks.
  const int64_t work_per_item = std::max<int64_t>(1, C * TT * std::min(S, plan.tile));
  plan.grain = std::max<int64_t>(1, (int64_t(1) << 15) / work_per_item);
  return plan;
}

// tm[0..n) = sum over the TT steps of xc[t * tstride + i], in acc_t (TT >= 2).
template <typename scalar_t, typename acc_t>
inline void time_sum(acc_t* __restrict__ tm, const scalar_t* xc, int64_t TT, int64_t tstride, int64_t n) {
  for (int64_t i = 0; i < n; ++i) tm[i] = acc_t(xc[i]);
  for (int64_t t = 1; t < TT; ++t) {
    const scalar_t* xt = xc + t * tstride;
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; ++i) tm[i] += acc_t(xt[i]);
  }
}

template <int PK, typename scalar_t, typename acc_t>
void fwd_impl(const scalar_t* x, acc_t* out, int64_t R, int64_t TT, int64_t C, int64_t S, int64_t tstride,
              acc_t p) {
  const TilePlan plan = plan_tiles(R, TT, C, S);
  const int64_t tile = plan.tile, ntiles = plan.ntiles;
  const acc_t inv_t = acc_t(1) / acc_t(TT), inv_c = acc_t(1) / acc_t(C);
  at::parallel_for(0, R * ntiles, plan.grain, [&](int64_t begin, int64_t end) {
    acc_t acc[kTile];
    acc_t tm[kTile];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / ntiles, s0 = (w % ntiles) * tile;
      const int64_t n = std::min(tile, S - s0);
      for (int64_t i = 0; i < n; ++i) acc[i] = acc_t(0);
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xc = x + (r * C + c) * S + s0;
        if (TT == 1) {
          _Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) acc[i] += abs_pow<PK, acc_t>(acc_t(xc[i]), p);
        } else {
          time_sum(tm, xc, TT, tstride, n);
          _Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) acc[i] += abs_pow<PK, acc_t>(tm[i] * inv_t, p);
        }
      }
      acc_t* o = out + r * S + s0;
      for (int64_t i = 0; i < n; ++i) o[i] = acc[i] * inv_c;
    }
  });
}

template <int PK, typename scalar_t, typename acc_t>
void bwd_impl(const acc_t* g, const scalar_t* x, scalar_t* gx, int64_t R, int64_t TT, int64_t C, int64_t S,
              int64_t tstride, acc_t p) {
  const TilePlan plan = plan_tiles(R, TT, C, S);
  const int64_t tile = plan.tile, ntiles = plan.ntiles;
  const acc_t inv_t = acc_t(1) / acc_t(TT), inv_c = acc_t(1) / acc_t(C);
  at::parallel_for(0, R * ntiles, plan.grain, [&](int64_t begin, int64_t end) {
    acc_t gs[kTile];
    acc_t tm[kTile];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / ntiles, s0 = (w % ntiles) * tile;
      const int64_t n = std::min(tile, S - s0);
      // d m / d (mean_t feat) carries 1/C; d (mean_t feat) / d feat_t carries 1/T.
      for (int64_t i = 0; i < n; ++i) gs[i] = g[r * S + s0 + i] * inv_c * inv_t;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (r * C + c) * S + s0;
        const scalar_t* xc = x + off;
        scalar_t* gc = gx + off;
        if (TT == 1) {
          _Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) gc[i] = scalar_t(gs[i] * abs_pow_grad<PK, acc_t>(acc_t(xc[i]), p));
        } else {
          time_sum(tm, xc, TT, tstride, n);
          // Every step gets the same gradient (the time mean is linear): gx holds one step, which the
          // caller returns expanded over T.
          _Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) gc[i] = scalar_t(gs[i] * abs_pow_grad<PK, acc_t>(tm[i] * inv_t, p));
        }
      }
    }
  });
}

at::Tensor attention_map_fwd_cpu(const at::Tensor& feat_, double p, bool time_mean) {
  check_attention_inputs(feat_, p, "lasnn::attention_map_fwd");
  TORCH_CHECK_VALUE(feat_.device().is_cpu(), "lasnn::attention_map_fwd (cpu): feat must be on CPU");
  const at::Tensor feat = feat_.contiguous();
  const int64_t T = feat.size(0), B = feat.size(1), C = feat.size(2), S = feat.size(3);
  at::Tensor out = at::empty(attention_map_shape(feat, time_mean),
                             feat.options().dtype(attention_map_dtype(feat.scalar_type())));
  if (out.numel() == 0) return out;
  // The mean over zero steps is NaN, as torch's mean of an empty dimension.
  if (T == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  const AttentionRows rows = attention_rows(feat, time_mean);
  const int64_t R = rows.R, TT = rows.TT;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "attention_map_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = feat.data_ptr<scalar_t>();
    acc_t* o = out.data_ptr<acc_t>();
    dispatch_attention_pow(p, [&](auto pk) {
      fwd_impl<decltype(pk)::value, scalar_t, acc_t>(x, o, R, TT, C, S, B * C * S, acc_t(p));
    });
  });
  return out;
}

at::Tensor attention_map_bwd_cpu(const at::Tensor& grad_map_, const at::Tensor& feat_, double p, bool time_mean) {
  check_attention_inputs(feat_, p, "lasnn::attention_map_bwd");
  TORCH_CHECK_VALUE(feat_.device().is_cpu(), "lasnn::attention_map_bwd (cpu): feat must be on CPU");
  check_attention_grad_map(grad_map_, feat_, time_mean);
  const at::Tensor feat = feat_.contiguous();
  const at::Tensor g = grad_map_.to(attention_map_dtype(feat.scalar_type())).contiguous();
  const int64_t B = feat.size(1), C = feat.size(2), S = feat.size(3);
  at::Tensor grad_feat = attention_grad_buffer(feat, time_mean);
  if (grad_feat.numel() == 0 || feat.numel() == 0) return attention_grad_result(grad_feat, feat, time_mean);
  const AttentionRows rows = attention_rows(feat, time_mean);
  const int64_t R = rows.R, TT = rows.TT;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "attention_map_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = feat.data_ptr<scalar_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    scalar_t* gx = grad_feat.data_ptr<scalar_t>();
    dispatch_attention_pow(p, [&](auto pk) {
      bwd_impl<decltype(pk)::value, scalar_t, acc_t>(gp, x, gx, R, TT, C, S, B * C * S, acc_t(p));
    });
  });
  return attention_grad_result(grad_feat, feat, time_mean);
}

}  // namespace

TORCH_LIBRARY_IMPL(lasnn, CPU, m) {
  m.impl("attention_map_fwd", &attention_map_fwd_cpu);
  m.impl("attention_map_bwd", &attention_map_bwd_cpu);
}

}  // namespace lasnn
