"""Modules: spiking neurons (and, as they land, encoders, losses, spikify)."""

from lasnn.nn.neurons import IF, LIF
from lasnn.nn.qcfs import QCFS

__all__ = ["IF", "LIF", "QCFS"]
