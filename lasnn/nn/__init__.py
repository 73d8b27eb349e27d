"""Modules: spiking neurons (and, as they land, encoders, losses, spikify)."""

from lasnn.nn.encoders import DirectEncoder, PoissonEncoder
from lasnn.nn.losses import AttentionTransferLoss, KDLoss
from lasnn.nn.neurons import IF, LIF, count_spikes
from lasnn.nn.pool import AdaptiveAvgPool2d, AvgPool1d, AvgPool2d
from lasnn.nn.qcfs import QCFS
from lasnn.nn.spikify import SNN, FoldedNeuron, default_neuron, spikify

__all__ = ["IF", "LIF", "QCFS", "AdaptiveAvgPool2d", "AvgPool1d", "AvgPool2d", "count_spikes"]
__all__ += ["AttentionTransferLoss", "KDLoss"]
__all__ += ["SNN", "DirectEncoder", "FoldedNeuron", "PoissonEncoder", "default_neuron", "spikify"]
