"""ANN-to-SNN conversion baseline (issue 6): BN folding, threshold calibration, IF neurons, latency curves.

``lasnn.convert(ann, calib_loader, method=...)`` -> ``ConvertedSNN``;
``lasnn.accuracy_vs_timesteps(snn, loader, T_max)`` -> ``{T: accuracy}`` from one simulation.
Commands (``lasnn convert``, ``lasnn evaluate``, ``lasnn demo``): ``lasnn/convert/cli.py``.
"""

from lasnn.convert.convert import METHODS, ConvertedSNN, IFNeuron, calibrate_thresholds, convert
from lasnn.convert.fold import fold_batchnorm
from lasnn.convert.latency import accuracy_vs_timesteps

__all__ = [
    "METHODS",
    "ConvertedSNN",
    "IFNeuron",
    "accuracy_vs_timesteps",
    "calibrate_thresholds",
    "convert",
    "fold_batchnorm",
]
