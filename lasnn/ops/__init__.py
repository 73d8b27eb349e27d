"""Public functional ops (torch.autograd.Function + torch.library ops), one module per op."""

from lasnn.ops.attention import AttentionMapFunction, attention_loss, attention_map, attention_map_raw, kd_loss
from lasnn.ops.lif import LIFFunction, lif

__all__ = ["LIFFunction", "lif"]
__all__ += ["AttentionMapFunction", "attention_loss", "attention_map", "attention_map_raw", "kd_loss"]
