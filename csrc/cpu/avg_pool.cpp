// Non-overlapping average pooling on CPU (kernel = stride, no padding, floor mode): the pooling of a
// spiking layer's output, which the time-folded SNN body runs on tensors T times larger than the ANN's.
// ATen's NCHW avg_pool2d kernel is generic (window bounds and divisor per output element, no
// vectorisation) and cost as much as the convolution next to it on a T=4 student; this one walks each
// [H, W] plane a row of windows at a time.
//
//   avg_pool_fwd(x [P..., H, W] or [P..., L], kernel [kh, kw] or [k]) -> out [P..., H/kh, W/kw] (floor)
//     out[p, i, j] = (sum_{a < kh, b < kw} x[p, i*kh + a, j*kw + b]) / (kh*kw)
//   avg_pool_bwd(grad_out, input_sizes, kernel, channels_last) -> grad_x [input_sizes]
//     grad_x[p, h, w] = grad_out[p, h/kh, w/kw] / (kh*kw) inside a window, 0 in the rows/columns the floor
//     mode drops.
// The window is summed in ATen's order (row by row, left to right, from 0, in opmath: fp32 for
// fp16/bf16) and divided, not multiplied by a reciprocal, so results are bit-identical to
// torch.nn.functional.avg_pool1d/2d with the same kernel and stride (tested in tests/test_avg_pool.py).
// A channels-last 4-d input is pooled as it lies and gives a channels-last output (the backward is told by
// its flag, as its gradient may arrive in either layout); anything else is made contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace lasnn {
namespace {

constexpr int64_t kGrain = 1 << 15;  // input elements per parallel task

struct PoolGeom {
  int64_t planes, H, W, kh, kw, Ho, Wo;
};

PoolGeom geometry(at::IntArrayRef sizes, at::IntArrayRef kernel, const char* op) {
  const int64_t d = static_cast<int64_t>(kernel.size());
  TORCH_CHECK_VALUE(d == 1 || d == 2, op, ": kernel must have 1 or 2 sizes, got ", kernel);
  TORCH_CHECK_VALUE(static_cast<int64_t>(sizes.size()) >= d + 1, op, ": input must have at least ", d + 1,
                    " dims for a ", d, "-d pool, got sizes ", sizes);
  for (int64_t k : kernel) TORCH_CHECK_VALUE(k >= 1, op, ": kernel sizes must be >= 1, got ", kernel);
  PoolGeom g{};
  const int64_t r = static_cast<int64_t>(sizes.size());
  g.H = d == 2 ? sizes[r - 2] : 1;
  g.W = sizes[r - 1];
  g.kh = d == 2 ? kernel[0] : 1;
  g.kw = kernel[d - 1];
  TORCH_CHECK_VALUE(g.H >= g.kh && g.W >= g.kw, op, ": input spatial sizes ", sizes.slice(r - d),
                    " are smaller than the kernel ", kernel);
  g.planes = 1;
  for (int64_t i = 0; i < r - d; ++i) g.planes *= sizes[i];
  g.Ho = g.H / g.kh;
  g.Wo = g.W / g.kw;
  return g;
}

std::vector<int64_t> out_sizes(at::IntArrayRef sizes, const PoolGeom& g, int64_t d) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  if (d == 2) s[s.size() - 2] = g.Ho;
  s[s.size() - 1] = g.Wo;
  return s;
}

// One output row of windows: kh input rows starting at `in`, row stride W.
template <typename scalar_t, int KH, int KW>
inline void pool_row(const scalar_t* in, scalar_t* out, int64_t W, int64_t Wo, int64_t kh, int64_t kw,
                     at::opmath_type<scalar_t> div) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KHr = KH > 0 ? KH : kh;
  const int64_t KWr = KW > 0 ? KW : kw;
  for (int64_t j = 0; j < Wo; ++j) {
    acc_t s = 0;
    for (int64_t a = 0; a < KHr; ++a) {
      const scalar_t* r = in + a * W + j * KWr;
      for (int64_t b = 0; b < KWr; ++b) s += static_cast<acc_t>(r[b]);
    }
    out[j] = static_cast<scalar_t>(s / div);
  }
}

template <typename scalar_t, int KH, int KW>
void pool_fwd_planes(const scalar_t* x, scalar_t* y, const PoolGeom& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t div = static_cast<acc_t>(g.kh * g.kw);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.H * g.W));
  at::parallel_for(0, g.planes, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const scalar_t* xp = x + p * g.H * g.W;
      scalar_t* yp = y + p * g.Ho * g.Wo;
      for (int64_t i = 0; i < g.Ho; ++i) {
        pool_row<scalar_t, KH, KW>(xp + i * g.kh * g.W, yp + i * g.Wo, g.W, g.Wo, g.kh, g.kw, div);
      }
    }
  });
}

// Channels-last [N, H, W, C] memory: each window is summed for all C channels at once (the channel loop is
// innermost and contiguous, so it vectorises), in the same window order as above, so every output element
// is the same sum as in NCHW.
template <typename scalar_t>
void pool_fwd_channels_last(const scalar_t* x, scalar_t* y, const PoolGeom& g, int64_t N, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t div = static_cast<acc_t>(g.kh * g.kw);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.kh * g.W * C));
  at::parallel_for(0, N * g.Ho, grain, [&](int64_t b0, int64_t e0) {
    std::vector<acc_t> acc(static_cast<size_t>(C));
    for (int64_t r = b0; r < e0; ++r) {
      const int64_t n = r / g.Ho, i = r % g.Ho;
      const scalar_t* xr = x + ((n * g.H + i * g.kh) * g.W) * C;
      scalar_t* yr = y + r * g.Wo * C;
      for (int64_t j = 0; j < g.Wo; ++j) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t a = 0; a < g.kh; ++a) {
          for (int64_t b = 0; b < g.kw; ++b) {
            const scalar_t* px = xr + (a * g.W + j * g.kw + b) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(px[c]);
          }
        }
        scalar_t* py = yr + j * C;
        for (int64_t c = 0; c < C; ++c) py[c] = static_cast<scalar_t>(acc[c] / div);
      }
    }
  });
}

// Channels-last pooling applies to a 4-d tensor laid out as channels-last and not also contiguous (C = 1 or
// H = W = 1 are both, and take the contiguous path with the same memory).
bool is_channels_last_4d(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor avg_pool_fwd_cpu(const at::Tensor& x_, at::IntArrayRef kernel) {
  TORCH_CHECK_VALUE(x_.is_floating_point(), "lasnn::avg_pool_fwd: x must be a floating tensor, got ",
                    x_.scalar_type());
  const PoolGeom g = geometry(x_.sizes(), kernel, "lasnn::avg_pool_fwd");
  const int64_t d = static_cast<int64_t>(kernel.size());
  if (d == 2 && is_channels_last_4d(x_)) {
    at::Tensor y = at::empty(out_sizes(x_.sizes(), g, d), x_.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (y.numel() == 0) return y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "avg_pool_fwd_cpu_cl", [&] {
      pool_fwd_channels_last<scalar_t>(x_.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g,
                                       x_.size(0), x_.size(1));
    });
    return y;
  }
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty(out_sizes(x.sizes(), g, d), x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_pool_fwd_cpu", [&] {
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* yd = y.mutable_data_ptr<scalar_t>();
    // the kernels of the zoo's pools get fixed trip counts, which the compiler unrolls
    if (g.kh == 2 && g.kw == 2) {
      pool_fwd_planes<scalar_t, 2, 2>(xd, yd, g);
    } else if (g.kh == 1 && g.kw == 2) {
      pool_fwd_planes<scalar_t, 1, 2>(xd, yd, g);
    } else {
      pool_fwd_planes<scalar_t, 0, 0>(xd, yd, g);
    }
  });
  return y;
}

// One plane's gradient: the first input row of each window row is written from grad_out, the other
// kh - 1 rows copy it; rows and columns the floor mode dropped are zero.
template <typename scalar_t, int KW>
void pool_bwd_plane(const scalar_t* gop, scalar_t* gxp, const PoolGeom& g, at::opmath_type<scalar_t> div) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kw = KW > 0 ? KW : g.kw;
  for (int64_t i = 0; i < g.Ho; ++i) {
    scalar_t* row = gxp + i * g.kh * g.W;
    const scalar_t* grow = gop + i * g.Wo;
    for (int64_t j = 0; j < g.Wo; ++j) {
      // ATen adds grad / div to a zeroed gradient: 0 + v (which turns -0 into +0, as it does)
      const scalar_t v = static_cast<scalar_t>(acc_t(0) + static_cast<acc_t>(grow[j]) / div);
      for (int64_t c = 0; c < kw; ++c) row[j * kw + c] = v;
    }
    for (int64_t w = g.Wo * kw; w < g.W; ++w) row[w] = scalar_t(0);
    for (int64_t a = 1; a < g.kh; ++a) std::memcpy(row + a * g.W, row, g.W * sizeof(scalar_t));
  }
  if (g.Ho * g.kh < g.H) std::memset(gxp + g.Ho * g.kh * g.W, 0, (g.H - g.Ho * g.kh) * g.W * sizeof(scalar_t));
}

// Channels-last gradient: each output row of windows is computed once ([Wo, C] values), then copied into the
// kh input rows, each value to kw neighbouring pixels; the columns and rows the floor mode dropped are zero.
template <typename scalar_t>
void pool_bwd_channels_last(const scalar_t* go, scalar_t* gx, const PoolGeom& g, int64_t N, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t div = static_cast<acc_t>(g.kh * g.kw);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.kh * g.W * C));
  at::parallel_for(0, N * g.Ho, grain, [&](int64_t b0, int64_t e0) {
    for (int64_t r = b0; r < e0; ++r) {
      const int64_t n = r / g.Ho, i = r % g.Ho;
      const scalar_t* gr = go + r * g.Wo * C;
      scalar_t* row = gx + ((n * g.H + i * g.kh) * g.W) * C;
      // the first pixel of each window holds the values; ATen adds grad / div to a zeroed gradient: 0 + v
      for (int64_t j = 0; j < g.Wo; ++j) {
        scalar_t* px = row + j * g.kw * C;
        for (int64_t c = 0; c < C; ++c) px[c] = static_cast<scalar_t>(acc_t(0) + static_cast<acc_t>(gr[j * C + c]) / div);
        for (int64_t b = 1; b < g.kw; ++b) std::memcpy(px + b * C, px, C * sizeof(scalar_t));
      }
      std::memset(row + g.Wo * g.kw * C, 0, (g.W - g.Wo * g.kw) * C * sizeof(scalar_t));
      for (int64_t a = 1; a < g.kh; ++a) std::memcpy(row + a * g.W * C, row, g.W * C * sizeof(scalar_t));
      if (i == g.Ho - 1 && g.Ho * g.kh < g.H) {
        std::memset(row + g.kh * g.W * C, 0, (g.H - g.Ho * g.kh) * g.W * C * sizeof(scalar_t));
      }
    }
  });
}

at::Tensor avg_pool_bwd_cpu(const at::Tensor& grad_out_, at::IntArrayRef input_sizes, at::IntArrayRef kernel,
                            bool channels_last) {
  TORCH_CHECK_VALUE(grad_out_.is_floating_point(), "lasnn::avg_pool_bwd: grad_out must be a floating tensor, got ",
                    grad_out_.scalar_type());
  const PoolGeom g = geometry(input_sizes, kernel, "lasnn::avg_pool_bwd");
  const int64_t d = static_cast<int64_t>(kernel.size());
  const std::vector<int64_t> expect = out_sizes(input_sizes, g, d);
  TORCH_CHECK_VALUE(grad_out_.sizes() == at::IntArrayRef(expect), "lasnn::avg_pool_bwd: grad_out must have sizes ",
                    at::IntArrayRef(expect), " for input sizes ", input_sizes, " and kernel ", kernel, ", got ",
                    grad_out_.sizes());
  if (channels_last) {
    TORCH_CHECK_VALUE(d == 2 && input_sizes.size() == 4, "lasnn::avg_pool_bwd: channels_last needs a 2-d pool of a "
                      "4-d input, got input sizes ", input_sizes, " and kernel ", kernel);
    const at::Tensor go = grad_out_.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor gx = at::empty(input_sizes, go.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (gx.numel() == 0) return gx;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "avg_pool_bwd_cpu_cl", [&] {
      pool_bwd_channels_last<scalar_t>(go.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), g,
                                       input_sizes[0], input_sizes[1]);
    });
    return gx;
  }
  const at::Tensor go = grad_out_.contiguous();  // an expanded gradient is read once here, then freed
  at::Tensor gx = at::empty(input_sizes, go.options());
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "avg_pool_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t div = static_cast<acc_t>(g.kh * g.kw);
    const scalar_t* god = go.const_data_ptr<scalar_t>();
    scalar_t* gxd = gx.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.H * g.W));
    at::parallel_for(0, g.planes, grain, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const scalar_t* gop = god + p * g.Ho * g.Wo;
        scalar_t* gxp = gxd + p * g.H * g.W;
        if (g.kw == 2) {
          pool_bwd_plane<scalar_t, 2>(gop, gxp, g, div);
        } else {
          pool_bwd_plane<scalar_t, 0>(gop, gxp, g, div);
        }
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lasnn, CPU, m) {
  m.impl("avg_pool_fwd", &avg_pool_fwd_cpu);
  m.impl("avg_pool_bwd", &avg_pool_bwd_cpu);
}

}  // namespace lasnn
