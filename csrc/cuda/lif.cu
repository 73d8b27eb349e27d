// Fused multi-step LIF forward/backward on CUDA (dispatch key CUDA of lasnn::lif_fwd / lasnn::lif_bwd).
//
// Design: one thread owns VEC neighbouring neurons for the whole sequence; the time loop runs inside
// the kernel and the membrane stays in registers, so the forward moves the minimum: read x, write
// spikes (plus v_init/v_last). VEC = 16 bytes / sizeof(scalar_t) (4 fp32, 8 fp16/bf16, 2 fp64) when N
// is a multiple of VEC and every pointer is 16-byte aligned (one 16-byte load/store per step);
// otherwise VEC = 1 (plain coalesced scalar accesses; rows t*N would not be aligned anyway).
//
// Backward from the saved input x: the thread recomputes H_t forward, keeps it, then walks time in
// reverse (csrc/lasnn_math.h lif_backward_step). H is kept
//   - in shared memory (block scratch of blockDim x VEC x T accumulators) when that fits in 48 KiB
//     with at least 64 threads per block: traffic = read x, read grad_spikes, write grad_x, the
//     minimum for this op;
//   - otherwise (long sequences) in global memory: in the grad_x buffer itself for fp32/fp64 (each
//     element is read back by the thread that wrote it, right before it overwrites it with dL/dx_t),
//     and in an fp32 [T, N] scratch for fp16/bf16, because rounding H to 16 bits would flip spikes
//     whose membrane lies just below the threshold and perturb the surrogate. Extra traffic: one
//     write and one read of T x N accumulators.
// Only this thread ever touches its scratch slots, so neither path needs a barrier.
//
// Math: csrc/lasnn_math.h (shared with csrc/cpu/lif.cpp); oracle: lasnn/reference/lif.py.
// Headers are kept light on purpose (no ATen/ATen.h, no ATen/cuda/CUDAContext.h): see DESIGN.md.
//
// LASNN_LIF_HOST_EMULATION (tests only): compiles just the kernels and the pure helpers, as host code,
// so that tests/test_lif_gpu_kernels.py can execute every kernel path thread by thread on a machine
// without a GPU. The kernels have no barriers, so running the threads one after another is a valid
// schedule. The build never defines it.
#ifndef LASNN_LIF_HOST_EMULATION
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lif_launch.h"
#define LASNN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "lasnn_math.h"

namespace lasnn {
namespace {

// ---------------------------------------------------------------------------------------------------
// Storage types: torch dtype -> CUDA type, accumulation type, conversions.
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  using acc_t = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float a) { return a; }
};
template <>
struct Storage<double> {
  using acc_t = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double a) { return a; }
};
template <>
struct Storage<__half> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float a) { return __float2half_rn(a); }
};
template <>
struct Storage<__nv_bfloat16> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float a) { return __float2bfloat16_rn(a); }
};

// VEC elements moved with one aligned access (16 bytes for the vectorised path).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Raw aligned vector access of VEC elements of type T (no conversion).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = pk.v[j];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = in[j];
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_acc(const T* p, typename Storage<T>::acc_t (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = Storage<T>::load(pk.v[j]);
}

// load_acc of p + n0, or zeros when p is null (an optional v_init / grad_v_last).
template <typename T, int VEC>
__device__ __forceinline__ void load_acc_or_zero(const T* p, int64_t n0, typename Storage<T>::acc_t (&out)[VEC]) {
  if (p != nullptr) {
    load_acc<T, VEC>(p + n0, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = typename Storage<T>::acc_t(0);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_acc(T* p, const typename Storage<T>::acc_t (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = Storage<T>::store(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ---------------------------------------------------------------------------------------------------
// Kernels. x, spikes, grad_*: [T, N] contiguous; v0, v_last, gvl, gv0: [N] (v0/gvl may be null = zeros).

// Forward: spikes_t = S_t, v_last = V_T. Reference: lasnn/reference/lif.py lif_reference.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(128) lif_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v0,
                                                      scalar_t* __restrict__ spikes, scalar_t* __restrict__ v_last,
                                                      int64_t T, int64_t N,
                                                      LIFParams<typename Storage<scalar_t>::acc_t> P) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  // N % VEC == 0 on the vectorised path, so a group is either wholly inside or wholly outside.
  if (n0 >= N) return;
  acc_t v[VEC];
  load_acc_or_zero<scalar_t, VEC>(v0, n0, v);
  const scalar_t* xp = x + n0;
  scalar_t* sp = spikes + n0;
  // Unrolling lets the loads of the next steps issue before this step's recurrence finishes.
#pragma unroll 4
  for (int64_t t = 0; t < T; ++t) {
    acc_t xv[VEC], s[VEC];
    load_acc<scalar_t, VEC>(xp + t * N, xv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t h = lif_charge<acc_t>(v[j], xv[j], P);
      s[j] = lif_fire_reset<acc_t>(h, &v[j], P);
    }
    store_acc<scalar_t, VEC>(sp + t * N, s);
  }
  store_acc<scalar_t, VEC>(v_last + n0, v);
}

// Backward: recompute H_t (t = 0..T-1) into the scratch, then reverse with lif_backward_step.
// gs_bcast: grad_spikes is an expanded view with neuron stride 0 (what spikes.sum() or spikes.mean() send
// back), read in place as one value per step at gs[t * gs_step]; otherwise it is [T, N] contiguous.
// SMEM: scratch in dynamic shared memory, slot (t, j) of thread i at [(t * VEC + j) * blockDim + i]
//       (consecutive threads hit consecutive banks);
// else: scratch is the global [T, N] buffer hbuf (grad_x itself for fp32/fp64, see the file comment).
template <typename scalar_t, int VEC, bool SMEM>
__global__ void __launch_bounds__(128) lif_bwd_kernel(const scalar_t* __restrict__ gs, const scalar_t* __restrict__ gvl,
                                                      const scalar_t* __restrict__ x, const scalar_t* __restrict__ v0,
                                                      scalar_t* gx, scalar_t* __restrict__ gv0,
                                                      typename Storage<scalar_t>::acc_t* hbuf, int64_t T, int64_t N,
                                                      bool gs_bcast, int64_t gs_step,
                                                      LIFParams<typename Storage<scalar_t>::acc_t> P) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  // gx and hbuf may alias (fp32/fp64 global path), hence no __restrict__ on them.
  LASNN_DYNAMIC_SMEM(lasnn_lif_smem);
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (n0 >= N) return;  // no barrier below, so early exit is safe
  acc_t* hs;  // this thread's H slots: (t, j) at hs[t * stride_t + j * (SMEM ? blockDim.x : 1)]
  int64_t stride_t;
  if constexpr (SMEM) {
    hs = reinterpret_cast<acc_t*>(lasnn_lif_smem) + threadIdx.x;
    stride_t = static_cast<int64_t>(VEC) * blockDim.x;
  } else {
    hs = hbuf + n0;
    stride_t = N;
  }

  acc_t v[VEC];
  load_acc_or_zero<scalar_t, VEC>(v0, n0, v);
  const scalar_t* xp = x + n0;
#pragma unroll 4
  for (int64_t t = 0; t < T; ++t) {
    acc_t xv[VEC];
    load_acc<scalar_t, VEC>(xp + t * N, xv);
    acc_t h[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      h[j] = lif_charge<acc_t>(v[j], xv[j], P);
      lif_fire_reset<acc_t>(h[j], &v[j], P);
    }
    if constexpr (SMEM) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) hs[t * stride_t + j * blockDim.x] = h[j];
    } else {
      store_vec<acc_t, VEC>(hs + t * stride_t, h);  // aligned: see launch_bwd
    }
  }

  acc_t gv[VEC];  // dL/dV_t, flowing backwards
  load_acc_or_zero<scalar_t, VEC>(gvl, n0, gv);
  const scalar_t* gsp = gs + n0;
  scalar_t* gxp = gx + n0;
#pragma unroll 4
  for (int64_t t = T - 1; t >= 0; --t) {
    acc_t g[VEC], h[VEC];
    if (gs_bcast) {  // the same branch for every thread of the launch
      const acc_t gt = Storage<scalar_t>::load(gs[t * gs_step]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = gt;
    } else {
      load_acc<scalar_t, VEC>(gsp + t * N, g);
    }
    // Read all of H_t before writing grad_x_t: on the aliased global path they share the address.
    if constexpr (SMEM) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) h[j] = hs[t * stride_t + j * blockDim.x];
    } else {
      load_vec<acc_t, VEC>(hs + t * stride_t, h);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = lif_backward_step<acc_t>(h[j], g[j], &gv[j], P);
    store_acc<scalar_t, VEC>(gxp + t * N, g);
  }
  store_acc<scalar_t, VEC>(gv0 + n0, gv);
}

// ---------------------------------------------------------------------------------------------------
// Launchers.

// 128 threads per block: small N still spreads over every SM (N = 2^16 fp32 gives 128 blocks), and
// large N keeps plenty of 16-byte loads in flight (the time loop is unrolled by 4).
constexpr int kThreads = 128;
constexpr int64_t kSmemBudget = 48 * 1024;  // the default per-block limit: no opt-in attribute needed


// Backward launch plan. Shared-memory path: the widest vector, then the largest block (128 or 64
// threads) whose H scratch fits the budget (fp32: T <= 24 with 16-byte vectors and 128 threads, up to
// T = 192 scalar with 64; fp64 half of that). Below 64 threads per block too few loads would be in
// flight per SM; the global path (more traffic, full occupancy) is then the faster choice.
struct BwdPlan {
  int vec;
  int threads;
  bool smem;
};

BwdPlan plan_bwd(int64_t T, int max_vec, int64_t acc_bytes) {
  const int vecs[2] = {max_vec, 1};
  for (const int vec : vecs) {
    for (int threads = kThreads; threads >= 64; threads /= 2) {
      if (static_cast<int64_t>(threads) * vec * T * acc_bytes <= kSmemBudget) return {vec, threads, true};
    }
  }
  return {max_vec, kThreads, false};
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifndef LASNN_LIF_HOST_EMULATION

void check_lif_inputs_cuda(const at::Tensor& x, const std::optional<at::Tensor>& v_init, double tau,
                           double v_threshold, double v_reset, double alpha, const char* op) {
  check_lif_inputs(x, v_init, tau, v_threshold, v_reset, alpha, op);
  TORCH_CHECK_VALUE(x.is_cuda(), op, " (cuda): x must be a CUDA tensor, got one on ", x.device());
}

// Blocks for `groups` thread-groups of `threads`; gridDim.x is limited to 2^31 - 1.
unsigned int grid_blocks(int64_t groups, int threads) {
  const int64_t blocks = ceil_div(groups, threads);
  TORCH_CHECK_VALUE(blocks <= 2147483647LL, "lasnn::lif (cuda): N is too large for one launch (", blocks,
                    " blocks)");
  return static_cast<unsigned int>(blocks);
}

// Calls f(tag), tag a value of the CUDA storage type of `dtype` (the lambda reads it with decltype).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kDouble:
      f(double{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK_TYPE(false, op, " (cuda): x must be float16, bfloat16, float32 or float64, got ", dtype);
  }
}

template <typename scalar_t>
void launch_fwd(const at::Tensor& x, const at::Tensor& v_init, at::Tensor& spikes, at::Tensor& v_last, double tau,
                double v_threshold, double v_reset, bool soft_reset, bool decay_input, cudaStream_t stream) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t T = x.size(0), N = x.size(1);
  const auto P = make_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input, false, 0, 1.0);
  const auto* xp = reinterpret_cast<const scalar_t*>(x.const_data_ptr());
  const auto* v0 = v_init.defined() ? reinterpret_cast<const scalar_t*>(v_init.const_data_ptr()) : nullptr;
  auto* sp = reinterpret_cast<scalar_t*>(spikes.mutable_data_ptr());
  auto* vl = reinterpret_cast<scalar_t*>(v_last.mutable_data_ptr());
  const bool vec = N % kVec == 0 && aligned16(xp) && aligned16(v0) && aligned16(sp) && aligned16(vl);
  if (vec) {
    const unsigned int blocks = grid_blocks(N / kVec, kThreads);
    lif_fwd_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(xp, v0, sp, vl, T, N, P);
  } else {
    const unsigned int blocks = grid_blocks(N, kThreads);
    lif_fwd_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(xp, v0, sp, vl, T, N, P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_bwd_vec(int threads, bool smem, const scalar_t* gs, const scalar_t* gvl, const scalar_t* x,
                    const scalar_t* v0, scalar_t* gx, scalar_t* gv0, typename Storage<scalar_t>::acc_t* hbuf,
                    int64_t T, int64_t N, bool gs_bcast, int64_t gs_step,
                    const LIFParams<typename Storage<scalar_t>::acc_t>& P, cudaStream_t stream) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  const unsigned int blocks = grid_blocks(ceil_div(N, VEC), threads);
  if (smem) {
    const size_t bytes = static_cast<size_t>(threads) * VEC * T * sizeof(acc_t);
    lif_bwd_kernel<scalar_t, VEC, true>
        <<<blocks, threads, bytes, stream>>>(gs, gvl, x, v0, gx, gv0, nullptr, T, N, gs_bcast, gs_step, P);
  } else {
    lif_bwd_kernel<scalar_t, VEC, false>
        <<<blocks, threads, 0, stream>>>(gs, gvl, x, v0, gx, gv0, hbuf, T, N, gs_bcast, gs_step, P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_bwd(const at::Tensor& gs_t, bool gs_bcast, int64_t gs_step, const at::Tensor& gvl_t, const at::Tensor& x,
                const at::Tensor& v_init, at::Tensor& grad_x, at::Tensor& grad_v_init,
                const LIFParams<typename Storage<scalar_t>::acc_t>& P, cudaStream_t stream) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t T = x.size(0), N = x.size(1);
  const auto* gs = reinterpret_cast<const scalar_t*>(gs_t.const_data_ptr());
  const auto* gvl = gvl_t.defined() ? reinterpret_cast<const scalar_t*>(gvl_t.const_data_ptr()) : nullptr;
  const auto* xp = reinterpret_cast<const scalar_t*>(x.const_data_ptr());
  const auto* v0 = v_init.defined() ? reinterpret_cast<const scalar_t*>(v_init.const_data_ptr()) : nullptr;
  auto* gx = reinterpret_cast<scalar_t*>(grad_x.mutable_data_ptr());
  auto* gv0 = reinterpret_cast<scalar_t*>(grad_v_init.mutable_data_ptr());
  // a broadcast grad_spikes is read one element at a time: its alignment does not matter
  const bool can_vec = N % kVec == 0 && (gs_bcast || aligned16(gs)) && aligned16(gvl) && aligned16(xp) &&
                       aligned16(v0) && aligned16(gx) && aligned16(gv0);

  const BwdPlan plan = plan_bwd(T, can_vec ? kVec : 1, sizeof(acc_t));
  // Global path: H goes into grad_x when it has the accumulation type, else into an fp32 scratch (see
  // the file comment for why not into a 16-bit grad_x). Alignment of its vectorised accesses: n0 and N
  // are multiples of VEC, and grad_x (checked by can_vec) and a fresh allocation are 16-byte aligned.
  at::Tensor scratch;
  acc_t* hbuf = nullptr;
  if (!plan.smem) {
    if constexpr (sizeof(scalar_t) == sizeof(acc_t)) {
      hbuf = reinterpret_cast<acc_t*>(gx);
    } else {
      scratch = at::empty({T, N}, x.options().dtype(at::kFloat));
      hbuf = reinterpret_cast<acc_t*>(scratch.mutable_data_ptr());
    }
  }
  if (plan.vec == kVec && kVec > 1) {
    launch_bwd_vec<scalar_t, kVec>(plan.threads, plan.smem, gs, gvl, xp, v0, gx, gv0, hbuf, T, N, gs_bcast, gs_step, P,
                                   stream);
  } else {
    launch_bwd_vec<scalar_t, 1>(plan.threads, plan.smem, gs, gvl, xp, v0, gx, gv0, hbuf, T, N, gs_bcast, gs_step, P,
                                stream);
  }
  // scratch is freed here while the kernel may still run: the caching allocator reuses the block
  // only for work queued later on this same stream, which is ordered after the kernel.
}

std::tuple<at::Tensor, at::Tensor> lif_fwd_cuda(const at::Tensor& x_, const std::optional<at::Tensor>& v_init_,
                                                double tau, double v_threshold, double v_reset, bool soft_reset,
                                                bool decay_input) {
  check_lif_inputs_cuda(x_, v_init_, tau, v_threshold, v_reset, 1.0, "lasnn::lif_fwd");
  const c10::cuda::CUDAGuard guard(x_.device());
  LifFwdTensors t = prepare_lif_fwd(x_, v_init_);
  if (t.done) return {t.spikes, t.v_last};
  const at::Tensor &x = t.x, &v_init = t.v_init;
  at::Tensor &spikes = t.spikes, &v_last = t.v_last;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  dispatch_dtype(x.scalar_type(), "lasnn::lif_fwd", [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_fwd<scalar_t>(x, v_init, spikes, v_last, tau, v_threshold, v_reset, soft_reset, decay_input, stream);
  });
  return {spikes, v_last};
}

std::tuple<at::Tensor, at::Tensor> lif_bwd_cuda(const at::Tensor& grad_spikes_,
                                                const std::optional<at::Tensor>& grad_v_last_, const at::Tensor& x_,
                                                const std::optional<at::Tensor>& v_init_, double tau,
                                                double v_threshold, double v_reset, bool soft_reset, bool decay_input,
                                                bool detach_reset, int64_t surrogate, double alpha) {
  check_lif_inputs_cuda(x_, v_init_, tau, v_threshold, v_reset, alpha, "lasnn::lif_bwd");
  check_lif_bwd_grads(grad_spikes_, grad_v_last_, x_, surrogate);
  const c10::cuda::CUDAGuard guard(x_.device());
  LifBwdTensors t = prepare_lif_bwd(grad_spikes_, grad_v_last_, x_, v_init_, /*row_broadcast=*/true);
  if (t.done) return {t.grad_x, t.grad_v_init};
  const at::Tensor &x = t.x, &gs = t.gs, &v_init = t.v_init, &gvl = t.gvl;
  at::Tensor &grad_x = t.grad_x, &grad_v_init = t.grad_v_init;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  dispatch_dtype(x.scalar_type(), "lasnn::lif_bwd", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename Storage<scalar_t>::acc_t;
    const auto P =
        make_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input, detach_reset, surrogate, alpha);
    launch_bwd<scalar_t>(gs, t.gs_row_broadcast, t.gs_step_stride, gvl, x, v_init, grad_x, grad_v_init, P, stream);
  });
  return {grad_x, grad_v_init};
}

#endif  // LASNN_LIF_HOST_EMULATION

}  // namespace

#ifndef LASNN_LIF_HOST_EMULATION
TORCH_LIBRARY_IMPL(lasnn, CUDA, m) {
  m.impl("lif_fwd", &lif_fwd_cuda);
  m.impl("lif_bwd", &lif_bwd_cuda);
}
#endif

}  // namespace lasnn
