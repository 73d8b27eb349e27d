// Fused raw attention map (forward) and its gradient (backward) on CUDA (dispatch key CUDA of
// lasnn::attention_map_fwd / lasnn::attention_map_bwd).
//
//   feat [T, B, C, S] -> time_mean: m[b, s]    = 1/C sum_c |1/T sum_t feat[t, b, c, s]|^p
//                        per step:  m[t, b, s] = 1/C sum_c |feat[t, b, c, s]|^p
// Per step is the time-mean case with T' = 1 over R = T*B rows ([T, B, C, S] contiguous is [T*B, C, S]).
//
// Forward: one block per (row, tile of kTileS = 32 positions); threadIdx.x walks the positions (a warp
// reads 32 consecutive elements: coalesced), threadIdx.y = 0..kSplitC-1 splits the channels so that
// kSplitC loads are in flight per position; the partial sums meet in shared memory. The features are
// read once, in fp32 (fp64 for fp64) accumulators; nothing of their size is allocated.
// Backward: one thread per (row, c, s): reads the T values and writes one gradient. In the time-mean
// mode the gradient is the same for every step (the mean is linear), so one [1, B, C, S] slab is written
// and returned expanded over T: one read of feat and grad_map, one write of grad_feat's distinct values.
// Math: csrc/attention_math.h and argument checks: csrc/attention_launch.h (both shared with
// csrc/cpu/attention.cpp); oracle: lasnn/reference/attention.py.
// Headers kept light on purpose (no ATen/ATen.h, no ATen/cuda/CUDAContext.h): see DESIGN.md.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_launch.h"
#include "attention_math.h"

namespace lasnn {
namespace {

constexpr int kTileS = 32;   // positions per block (one warp width: coalesced rows)
constexpr int kSplitC = 8;   // channel groups per block (blockDim.y)
constexpr int kBwdThreads = 256;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <int PK, typename scalar_t>
__global__ void __launch_bounds__(kTileS * kSplitC)
attention_map_fwd_kernel(const scalar_t* __restrict__ x, acc_type<scalar_t>* __restrict__ out, int64_t ntiles,
                         int64_t TT, int64_t C, int64_t S, int64_t tstride, acc_type<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t part[kSplitC][kTileS];
  const int64_t w = blockIdx.x;
  const int64_t r = w / ntiles;
  const int64_t s = (w % ntiles) * kTileS + threadIdx.x;
  const acc_t inv_t = acc_t(1) / acc_t(TT);
  acc_t acc = acc_t(0);
  if (s < S) {
    for (int64_t c = threadIdx.y; c < C; c += kSplitC) {
      const scalar_t* xc = x + (r * C + c) * S + s;
      acc_t tm = acc_t(0);
      for (int64_t t = 0; t < TT; ++t) tm += static_cast<acc_t>(xc[t * tstride]);
      acc += abs_pow<PK, acc_t>(tm * inv_t, p);
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && s < S) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int k = 0; k < kSplitC; ++k) total += part[k][threadIdx.x];
    // C = 0 gives 0 * inf = NaN, as torch's mean over an empty dimension.
    out[r * S + s] = total * (acc_t(1) / acc_t(C));
  }
}

template <int PK, typename scalar_t>
__global__ void __launch_bounds__(kBwdThreads)
attention_map_bwd_kernel(const acc_type<scalar_t>* __restrict__ g, const scalar_t* __restrict__ x,
                         scalar_t* __restrict__ gx, int64_t n, int64_t TT, int64_t C, int64_t S, int64_t tstride,
                         acc_type<scalar_t> p, acc_type<scalar_t> scale) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inv_t = acc_t(1) / acc_t(TT);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // i indexes [R, C, S]: its element of time step t sits at i + t * tstride.
    const int64_t s = i % S;
    const int64_t r = i / (C * S);
    acc_t tm = acc_t(0);
    for (int64_t t = 0; t < TT; ++t) tm += static_cast<acc_t>(x[i + t * tstride]);
    const acc_t v = g[r * S + s] * scale * abs_pow_grad<PK, acc_t>(tm * inv_t, p);
    // One write: gx is [R, C, S] (per step: R = T*B; time mean: the one step the caller expands over T).
    gx[i] = static_cast<scalar_t>(v);
  }
}

void check_inputs(const at::Tensor& feat, double p, const char* op) {
  check_attention_inputs(feat, p, op);
  TORCH_CHECK_VALUE(feat.is_cuda(), op, " (cuda): feat must be a CUDA tensor, got ", feat.device());
}

template <typename F>
void dispatch_dtype(at::ScalarType t, const char* op, F&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t);
  }
}

at::Tensor attention_map_fwd_cuda(const at::Tensor& feat_, double p, bool time_mean) {
  check_inputs(feat_, p, "lasnn::attention_map_fwd");
  const c10::cuda::CUDAGuard guard(feat_.device());
  const at::Tensor feat = feat_.contiguous();
  const int64_t T = feat.size(0), B = feat.size(1), C = feat.size(2), S = feat.size(3);
  at::Tensor out = at::empty(attention_map_shape(feat, time_mean),
                             feat.options().dtype(attention_map_dtype(feat.scalar_type())));
  if (out.numel() == 0) return out;
  if (T == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // mean over zero steps
  const AttentionRows rows = attention_rows(feat, time_mean);
  const int64_t R = rows.R, TT = rows.TT;
  const int64_t ntiles = (S + kTileS - 1) / kTileS;
  TORCH_CHECK_VALUE(R * ntiles <= int64_t(std::numeric_limits<int32_t>::max()),
                    "lasnn::attention_map_fwd (cuda): too many (row, tile) blocks: ", R * ntiles);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(feat.device().index()).stream();
  dispatch_dtype(feat.scalar_type(), "lasnn::attention_map_fwd", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const auto* xp = reinterpret_cast<const scalar_t*>(feat.const_data_ptr());
    auto* op = reinterpret_cast<acc_t*>(out.mutable_data_ptr());
    dispatch_attention_pow(p, [&](auto pk) {
      attention_map_fwd_kernel<decltype(pk)::value, scalar_t>
          <<<dim3(static_cast<unsigned>(R * ntiles)), dim3(kTileS, kSplitC), 0, stream>>>(
              xp, op, ntiles, TT, C, S, B * C * S, acc_t(p));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor attention_map_bwd_cuda(const at::Tensor& grad_map_, const at::Tensor& feat_, double p, bool time_mean) {
  check_inputs(feat_, p, "lasnn::attention_map_bwd");
  check_attention_grad_map(grad_map_, feat_, time_mean);
  const c10::cuda::CUDAGuard guard(feat_.device());
  const at::Tensor feat = feat_.contiguous();
  const at::Tensor g = grad_map_.to(attention_map_dtype(feat.scalar_type())).contiguous();
  const int64_t B = feat.size(1), C = feat.size(2), S = feat.size(3);
  at::Tensor grad_feat = attention_grad_buffer(feat, time_mean);
  if (grad_feat.numel() == 0 || feat.numel() == 0) return attention_grad_result(grad_feat, feat, time_mean);
  const AttentionRows rows = attention_rows(feat, time_mean);
  const int64_t R = rows.R, TT = rows.TT;
  const int64_t n = R * C * S;
  const int64_t blocks = std::min<int64_t>((n + kBwdThreads - 1) / kBwdThreads, int64_t(1) << 20);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(feat.device().index()).stream();
  dispatch_dtype(feat.scalar_type(), "lasnn::attention_map_bwd", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const auto* gp = reinterpret_cast<const acc_t*>(g.const_data_ptr());
    const auto* xp = reinterpret_cast<const scalar_t*>(feat.const_data_ptr());
    auto* gx = reinterpret_cast<scalar_t*>(grad_feat.mutable_data_ptr());
    // 1/C from the channel mean, 1/T from the time mean.
    const acc_t scale = acc_t(1) / (acc_t(C) * acc_t(TT));
    dispatch_attention_pow(p, [&](auto pk) {
      attention_map_bwd_kernel<decltype(pk)::value, scalar_t><<<static_cast<unsigned>(blocks), kBwdThreads, 0, stream>>>(
          gp, xp, gx, n, TT, C, S, B * C * S, acc_t(p), scale);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return attention_grad_result(grad_feat, feat, time_mean);
}

}  // namespace

TORCH_LIBRARY_IMPL(lasnn, CUDA, m) {
  m.impl("attention_map_fwd", &attention_map_fwd_cuda);
  m.impl("attention_map_bwd", &attention_map_bwd_cuda);
}

}  // namespace lasnn
