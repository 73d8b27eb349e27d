"""Spikes as bits: ``pack_bits`` / ``unpack_bits``, the storage format of low-memory BPTT (``lasnn.nn.lowmem``).

``lasnn::spike_pack`` / ``lasnn::spike_unpack`` (schemas in csrc/ops.cpp, CPU kernels in
csrc/cpu/spike_bits.cpp) do it in one pass each; on other devices, or without the extension, the same
format comes from torch ops (a matrix-vector product with ``[1, 2, ..., 128]`` and a table lookup).
Not differentiable: they store and restore saved tensors.
"""

from __future__ import annotations

import torch

from lasnn import _ext

__all__ = ["pack_bits", "unpack_bits"]

if _ext.c_has_op("spike_pack"):

    @torch.library.register_fake("lasnn::spike_pack")
    def _fake_pack(spikes):
        return spikes.new_empty(((spikes.numel() + 7) // 8,), dtype=torch.uint8)

    @torch.library.register_fake("lasnn::spike_unpack")
    def _fake_unpack(packed, numel, dtype):
        return packed.new_empty((numel,), dtype=dtype)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _bit_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8]``: row ``b`` holds the 8 bits of ``b``, least significant first, in ``dtype``."""
    key = (dtype, device)
    if key not in _TABLES:
        b = torch.arange(256, dtype=torch.int64)
        _TABLES[key] = ((b.unsqueeze(1) >> torch.arange(8)) & 1).to(dtype=dtype, device=device)
    return _TABLES[key]


def _use_c(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and _ext.c_has_op("spike_pack")


def pack_bits(spikes: torch.Tensor) -> torch.Tensor:
    """``spikes`` (any shape, values 0/1, any floating dtype) -> ``[ceil(numel / 8)]`` uint8 on its device;
    bit ``i`` of byte ``j`` is element ``8j + i`` (row-major order) being nonzero."""
    if not isinstance(spikes, torch.Tensor) or not spikes.is_floating_point():
        raise TypeError(f"spikes must be a floating-point tensor, got {type(spikes).__name__}"
                        + (f" of dtype {spikes.dtype}" if isinstance(spikes, torch.Tensor) else ""))
    if _use_c(spikes):
        return torch.ops.lasnn.spike_pack(spikes)
    flat = spikes.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # groups of 8 times [1, 2, ..., 128]: integers below 256, exact in every floating dtype (bf16 too)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=flat.dtype, device=flat.device)
    return ((flat.view(-1, 8) != 0).to(flat.dtype) @ weights).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[ceil(n / 8)]`` uint8 -> a contiguous 0/1 tensor of ``shape`` and ``dtype``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor from pack_bits, got {getattr(packed, 'dtype', type(packed))}")
    n = 1
    for d in shape:
        n *= int(d)
    if (n + 7) // 8 != packed.numel():
        raise ValueError(f"shape {tuple(shape)} ({n} elements) does not fit {packed.numel()} packed bytes")
    if _use_c(packed):
        return torch.ops.lasnn.spike_unpack(packed, n, dtype).view(shape)
    bits = _bit_table(dtype, packed.device)[packed.long()]
    return bits.reshape(-1)[:n].reshape(shape)
