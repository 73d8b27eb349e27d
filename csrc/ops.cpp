// Every lasnn op schema lives here (TORCH_LIBRARY(lasnn, m)); kernels register their own impl blocks:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(lasnn, CPU, m)
//   csrc/cuda/<op>.cu   TORCH_LIBRARY_IMPL(lasnn, CUDA, m)
// Fake (meta) kernels are registered from Python (lasnn/ops/*.py). Schemas only grow by appended
// defaulted arguments. The Python-side references of each op are in lasnn/reference/.
#include <Python.h>
#include <torch/library.h>

#include "lif_launch.h"

extern "C" {
// The module only has to exist so that `import lasnn._C` loads this library and runs the
// registrations below; all ops are reached through torch.ops.lasnn.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lasnn, m) {
  // Multi-step LIF neuron (see lasnn/reference/lif.py for the exact recurrence).
  //   x: [T, N] (any layout; flattened by the caller), v_init: [N] or None (zeros).
  //   surrogate: 0 sigmoid, 1 atan, 2 triangle, 3 rect (csrc/lasnn_math.h).
  // Returns spikes [T, N] in x's dtype and the membrane after the last step v_last [N].
  m.def(
      "lif_fwd(Tensor x, Tensor? v_init, float tau, float v_threshold, float v_reset, bool soft_reset, "
      "bool decay_input) -> (Tensor, Tensor)");
  // Backward from the saved input: recomputes H_t and walks time in reverse.
  //   grad_spikes: [T, N]; grad_v_last: [N] or None. Returns (grad_x [T, N], grad_v_init [N]).
  m.def(
      "lif_bwd(Tensor grad_spikes, Tensor? grad_v_last, Tensor x, Tensor? v_init, float tau, "
      "float v_threshold, float v_reset, bool soft_reset, bool decay_input, bool detach_reset, "
      "int surrogate, float alpha) -> (Tensor, Tensor)");
  // Raw attention map (before normalisation): feat [T, B, C, S] ->
  //   time_mean=True : [B, S]    mean_c |mean_t feat|^p
  //   time_mean=False: [T, B, S] mean_c |feat_t|^p
  // Returned in fp32 for fp16/bf16 input (fp64 for fp64).
  m.def("attention_map_fwd(Tensor feat, float p, bool time_mean) -> Tensor");
  // grad_map: the shape attention_map_fwd returned. Returns grad_feat shaped and typed like feat.
  m.def("attention_map_bwd(Tensor grad_map, Tensor feat, float p, bool time_mean) -> Tensor");
  // Spikes as bits (low-memory BPTT, lasnn/nn/lowmem.py): spikes (0/1, any float dtype and shape) ->
  // [ceil(numel / 8)] uint8, bit i of byte j = element 8j + i; and back to a contiguous [numel] tensor of
  // dtype. Not differentiable (storage format of saved tensors). CPU kernels; elsewhere the Python
  // fallback in lasnn/ops/spike_bits.py runs.
  m.def("spike_pack(Tensor spikes) -> Tensor");
  m.def("spike_unpack(Tensor packed, int numel, ScalarType dtype) -> Tensor");
  // Non-overlapping average pooling (kernel = stride, no padding, floor mode) of a spiking layer's output:
  //   x [P..., H, W] with kernel [kh, kw], or [P..., L] with [k] -> [P..., H/kh, W/kw] (floor), bit-identical
  //   to torch.nn.functional.avg_pool2d/1d. avg_pool_bwd: grad_out -> grad_x of input_sizes. A channels-last
  //   4-d x (not also contiguous) gives a channels-last output; channels_last=True gives a channels-last
  //   grad_x. CPU kernels (csrc/cpu/avg_pool.cpp); elsewhere lasnn/ops/avg_pool.py calls torch's pooling.
  m.def("avg_pool_fwd(Tensor x, int[] kernel) -> Tensor");
  m.def("avg_pool_bwd(Tensor grad_out, SymInt[] input_sizes, int[] kernel, bool channels_last=False) -> Tensor");
  // Which build of the CPU LIF kernels runs fp32 and bf16 on this machine: "avx512", "avx2" or "base"
  // (after LASNN_CPU_ISA); fp16 and fp64 always run "base". Shown by `python -m lasnn info` and the
  // benchmarks.
  m.def("cpu_lif_isa() -> str", TORCH_FN(lasnn::cpu_lif_isa_name));
}
