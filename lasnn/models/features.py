"""Feature taps: the named stage outputs of a model, for ANNs and for SNNs made by ``spikify``.

A model names its stages in a ``feature_layers`` dict (stage name -> module path); the zoo models do,
torchvision ResNets (``layer1``..``layer4``) and VGGs (the ReLU before each max pool) are recognised, and
any other model can pass ``layers=``. Taps are forward hooks on those modules; the tensors keep their
autograd graph, so a distillation loss on them trains the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lasnn.nn.spikify import SNN

__all__ = ["FeatureTap", "features", "stage_layers"]


def stage_layers(model: nn.Module) -> dict[str, str]:
    """Stage name -> module path of ``model``'s stage outputs (for an :class:`SNN`, paths inside ``body``).

    Uses ``model.feature_layers`` when present; otherwise recognises torchvision-style ResNets
    (``layer1``..``layer4``) and VGGs (``features`` Sequential: the activation before each pooling).
    Raises ValueError when the stages cannot be told.
    """
    net = model.body if isinstance(model, SNN) else model
    named = getattr(net, "feature_layers", None)
    if named:
        return dict(named)
    if all(hasattr(net, f"layer{i}") for i in (1, 2, 3, 4)):
        return {f"layer{i}": f"layer{i}" for i in (1, 2, 3, 4)}
    feats = getattr(net, "features", None)
    if isinstance(feats, nn.Sequential):
        out: dict[str, str] = {}
        mods = list(feats.named_children())
        for j, (_, m) in enumerate(mods):
            if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and j > 0:
                out[f"stage{len(out) + 1}"] = f"features.{mods[j - 1][0]}"
        if out:
            return out
    raise ValueError(
        f"cannot tell the stages of {type(net).__name__}: give it a feature_layers dict "
        "(stage name -> module path) or pass layers= to lasnn.features"
    )


def _resolve(model: nn.Module, names: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    if isinstance(names, Mapping):
        return dict(names)
    stages = stage_layers(model)
    if names is None:
        return stages
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise ValueError(f"unknown stage name(s) {unknown}; {type(model).__name__} has {list(stages)}")
    return {n: stages[n] for n in names}


class FeatureTap:
    """Context manager that records named stage outputs during ordinary forward calls.

    ``tap.features`` maps names to tensors ``[B, C, ...]`` (ANN) or ``[T, B, C, ...]`` (SNN, unfolded from
    the time-folded ``[T*B, C, ...]``) from the latest forward; a module run twice in one forward keeps
    the last output. Use it to get logits and features from one pass::

        with lasnn.FeatureTap(snn) as tap:
            logits = snn(x, return_steps=True)       # [T, B, classes]
        feats = tap.features                         # {"layer1": [T, B, C, H, W], ...}

    Args:
        model: an ANN or an :class:`SNN`.
        layers: stage names to keep (default: all of :func:`stage_layers`), or an explicit
            ``{name: module path}`` mapping (paths inside ``body`` for an SNN).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | Mapping[str, str] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.layers = _resolve(model, layers)
        self._net = model.body if isinstance(model, SNN) else model
        self._raw: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureTap:
        self._raw.clear()
        for name, path in self.layers.items():
            try:
                mod = self._net.get_submodule(path)
            except AttributeError as e:
                raise ValueError(f"stage {name!r}: no module at path {path!r} ({e})") from None
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"stage {name!r} must output a tensor, got {type(output).__name__}")
            self._raw[name] = output

        return hook

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """Stage name -> tensor from the latest forward (``[T, B, ...]`` for an SNN)."""
        if isinstance(self.model, SNN):
            T = self.model.neurons()[0].T  # the T of the latest call, set by SNN.forward
            return {k: v.reshape(T, v.shape[0] // T, *v.shape[1:]) for k, v in self._raw.items()}
        return dict(self._raw)

    def pop(self) -> dict[str, torch.Tensor]:
        """Like :attr:`features`, then forget them (the tap keeps no activations alive until the next forward)."""
        feats = self.features
        self._raw.clear()
        return feats


def features(
    model: nn.Module,
    x: torch.Tensor,
    layers: Iterable[str] | Mapping[str, str] | None = None,
    *,
    return_output: bool = False,
    **forward_kwargs: Any,
) -> dict[str, torch.Tensor] | tuple[Any, dict[str, torch.Tensor]]:
    """Run ``model(x)`` and return its named stage outputs.

    Args:
        model: an ANN (stages from ``feature_layers``, or torchvision ResNet/VGG) or an :class:`SNN`.
        x: the model's input (``[B, ...]``; an SNN also takes encoded ``[T, B, ...]``).
        layers: stage names (default all), or an explicit ``{name: module path}`` mapping.
        return_output: also return the model's output (logits) from the same pass.
        **forward_kwargs: passed to the forward, e.g. ``return_steps=True`` for an SNN.
    Returns:
        ``{name: [B, C, H, W]}`` for ANNs, ``{name: [T, B, C, H, W]}`` for SNNs (``[B, C, L]`` /
        ``[T, B, C, L]`` for 1-D models), in stage order; ``(output, dict)`` with ``return_output``.
    """
    with FeatureTap(model, layers) as tap:
        out = model(x, **forward_kwargs)
    feats = tap.features
    missing = [k for k in tap.layers if k not in feats]
    if missing:
        raise RuntimeError(f"stage(s) {missing} were not run by the forward pass")
    feats = {k: feats[k] for k in tap.layers}
    return (out, feats) if return_output else feats
