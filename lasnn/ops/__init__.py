"""Public functional ops (torch.autograd.Function + torch.library ops), one module per op."""

from lasnn.ops.lif import LIFFunction, lif

__all__ = ["LIFFunction", "lif"]
