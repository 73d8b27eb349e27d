"""Pure-PyTorch oracles of every op: plain time loops, float64-capable, differentiable by autograd.

Tests and benchmarks compare the fused kernels against these; they are also the ``reference`` backend.
"""

from lasnn.reference.attention import (
    attention_loss_reference,
    attention_map_raw_reference,
    attention_map_reference,
    kd_loss_reference,
)
from lasnn.reference.lif import SURROGATES, lif_reference, surrogate_grad_reference

__all__ = ["SURROGATES", "lif_reference", "surrogate_grad_reference"]
__all__ += ["attention_loss_reference", "attention_map_raw_reference", "attention_map_reference", "kd_loss_reference"]
