// Spikes as bits on CPU: the storage format of low-memory BPTT (lasnn/ops/spike_bits.py, lasnn/nn/lowmem.py).
// spike_pack: a tensor of 0/1 values (any float dtype, any shape) -> [ceil(numel / 8)] uint8, bit i of
// byte j = (element 8j + i != 0). spike_unpack: the inverse, into a fresh contiguous 1-d tensor of the
// given dtype. One pass over the float data each way (the torch-op composition needed four to six).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace lasnn {
namespace {

constexpr int64_t kGrain = 1 << 14;  // bytes of output per parallel task

at::Tensor spike_pack_cpu(const at::Tensor& spikes_) {
  TORCH_CHECK_VALUE(spikes_.is_floating_point(), "lasnn::spike_pack: spikes must be a floating tensor, got ",
                    spikes_.scalar_type());
  const at::Tensor spikes = spikes_.contiguous();
  const int64_t n = spikes.numel();
  const int64_t m = (n + 7) / 8;
  at::Tensor out = at::empty({m}, spikes.options().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, spikes.scalar_type(), "spike_pack_cpu", [&] {
    const scalar_t* x = spikes.data_ptr<scalar_t>();
    const int64_t full = n / 8;
    at::parallel_for(0, full, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const scalar_t* v = x + 8 * j;
        uint8_t byte = 0;
        for (int i = 0; i < 8; ++i) byte |= static_cast<uint8_t>(static_cast<float>(v[i]) != 0.0f) << i;
        o[j] = byte;
      }
    });
    if (full < m) {
      uint8_t byte = 0;
      for (int64_t k = 8 * full; k < n; ++k) byte |= static_cast<uint8_t>(static_cast<float>(x[k]) != 0.0f) << (k - 8 * full);
      o[full] = byte;
    }
  });
  return out;
}

at::Tensor spike_unpack_cpu(const at::Tensor& packed_, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(packed_.scalar_type() == at::kByte, "lasnn::spike_unpack: packed must be uint8, got ",
                    packed_.scalar_type());
  TORCH_CHECK_VALUE(numel >= 0 && (numel + 7) / 8 == packed_.numel(), "lasnn::spike_unpack: numel ", numel,
                    " does not fit packed of ", packed_.numel(), " bytes");
  TORCH_CHECK_VALUE(at::isFloatingType(dtype), "lasnn::spike_unpack: dtype must be floating, got ", dtype);
  const at::Tensor packed = packed_.contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "spike_unpack_cpu", [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t full = numel / 8;
    at::parallel_for(0, full, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const uint8_t byte = p[j];
        scalar_t* w = y + 8 * j;
        for (int i = 0; i < 8; ++i) w[i] = static_cast<scalar_t>(static_cast<float>((byte >> i) & 1));
      }
    });
    for (int64_t k = 8 * full; k < numel; ++k) {
      y[k] = static_cast<scalar_t>(static_cast<float>((p[full] >> (k - 8 * full)) & 1));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lasnn, CPU, m) {
  m.impl("spike_pack", &spike_pack_cpu);
  m.impl("spike_unpack", &spike_unpack_cpu);
}

}  // namespace lasnn
