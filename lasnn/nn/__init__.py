"""Modules: spiking neurons (and, as they land, encoders, losses, spikify)."""

from lasnn.nn.losses import AttentionTransferLoss, KDLoss
from lasnn.nn.neurons import IF, LIF
from lasnn.nn.qcfs import QCFS

__all__ = ["IF", "LIF", "QCFS"]
__all__ += ["AttentionTransferLoss", "KDLoss"]
