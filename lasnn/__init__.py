"""lasnn: layer-wise ANN-to-SNN knowledge distillation with fused LIF and attention-transfer kernels.

Importing lasnn never fails because the compiled extension or Triton is missing; ``python -m lasnn info``
says which backends each op has here and why the others are unavailable.

Functions named like their modules (``lif``, ``convert``, ``profile``) shadow them on purpose; the
subpackages ``data`` (data sets) and ``distill`` (the LaSNN trainer: ``distill.train_teacher``,
``distill.distill``, ``distill.load_run``) are exported as packages.
"""

from lasnn import backends, data, distill, models, nn
from lasnn.convert import accuracy_vs_timesteps, convert
from lasnn.models import FeatureTap, features
from lasnn.nir_io import from_nir, to_nir
from lasnn.nn.spikify import spikify
from lasnn.ops import lif
from lasnn.ops.attention import attention_loss, attention_map, kd_loss
from lasnn.profile import profile
from lasnn.runtime import keep_cpu_memory

__version__ = "0.1.0"
__all__ = [
    "FeatureTap",
    "__version__",
    "accuracy_vs_timesteps",
    "attention_loss",
    "attention_map",
    "backends",
    "convert",
    "data",
    "distill",
    "features",
    "from_nir",
    "kd_loss",
    "keep_cpu_memory",
    "lif",
    "models",
    "nn",
    "profile",
    "spikify",
    "to_nir",
]
