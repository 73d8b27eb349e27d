"""Triton kernels of lasnn (installed as ``lasnn.kernels``). Importable without a GPU or Triton.

``AVAILABLE`` lists the ops that have Triton kernels here; the launchers import Triton lazily.
"""

import contextlib

AVAILABLE: tuple[str, ...] = ()
AVAILABLE += ("attention_map",)
AVAILABLE += ("lif",)


def device_ctx(x):
    """Context that makes ``x``'s GPU the current device (Triton launches on the current one); no-op on CPU."""
    import torch

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
