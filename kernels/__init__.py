"""Triton kernels of lasnn (installed as ``lasnn.kernels``). Importable without a GPU or Triton.

``AVAILABLE`` lists the ops that have Triton kernels here; the launchers import Triton lazily.
"""

AVAILABLE: tuple[str, ...] = ()
AVAILABLE += ("attention_map",)
AVAILABLE += ("lif",)
