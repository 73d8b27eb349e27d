"""lasnn: layer-wise ANN-to-SNN knowledge distillation with fused LIF and attention-transfer kernels.

Importing lasnn never fails because the compiled extension or Triton is missing; ``python -m lasnn info``
says which backends each op has here and why the others are unavailable.
"""

from lasnn import backends, models, nn
from lasnn.convert import accuracy_vs_timesteps, convert  # the function shadows the subpackage, like lif
from lasnn.models import FeatureTap, features
from lasnn.nn.spikify import spikify
from lasnn.ops import lif
from lasnn.ops.attention import attention_loss, attention_map, kd_loss
from lasnn.profile import profile  # the function shadows the module, like lif

__version__ = "0.1.0"
__all__ = ["__version__", "accuracy_vs_timesteps", "backends", "convert", "lif", "nn"]
__all__ += ["attention_loss", "attention_map", "kd_loss"]
__all__ += ["FeatureTap", "features", "models", "profile", "spikify"]
from lasnn import data, distill  # noqa: E402  (issue 5: data sets; trainer: lasnn.distill.distill/train_teacher)

__all__ += ["data", "distill"]
