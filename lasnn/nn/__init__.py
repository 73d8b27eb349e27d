"""Modules: spiking neurons (and, as they land, encoders, losses, spikify)."""

from lasnn.nn.neurons import IF, LIF

__all__ = ["IF", "LIF"]
