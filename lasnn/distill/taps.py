"""Stage features for distillation: logits and named stage outputs from one forward pass.

The taps themselves are :class:`lasnn.FeatureTap` (``lasnn/models/features.py``); here they are wrapped
as a module that returns ``(logits, features)`` (so DistributedDataParallel can wrap it), and used to pair
student and teacher stages and to find the parameters a stage depends on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from lasnn.models.features import FeatureTap, stage_layers

__all__ = ["TappedModel", "match_pairs", "parameters_reaching"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class TappedModel(nn.Module):
    """Wraps a model so that ``forward(x)`` returns ``(logits, [stage features in `names` order])``.

    ANN features are ``[B, C, *S]``; SNN features (a spikify'd model, time folded inside) are returned as
    ``[T, B, C, *S]``. The hooks are live only inside this wrapper's forward (plain calls of the model
    record nothing). DistributedDataParallel wraps this module, so gradients of the features and of the
    logits are synchronised together.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self._tap = FeatureTap(_unwrap(model), self.names)  # raises for unknown stage names

    def forward(self, x: torch.Tensor, *, return_steps: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: ``[B, ...]`` -> ``(logits [B, classes], features)``; ``return_steps`` (a spikify'd model only):
        the per-step logits ``[T, B, classes]`` instead of their mean."""
        with self._tap:
            logits = self.model(x, return_steps=True) if return_steps else self.model(x)
        feats = self._tap.pop()  # keeps no activations alive between steps
        return logits, [feats[n] for n in self.names]


def _spatial(shape: torch.Size, snn: bool) -> tuple[int, ...]:
    return tuple(shape[3:] if snn else shape[2:])


@torch.no_grad()
def stage_shapes(model: nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Stage name -> feature shape for ``sample`` ``[B, ...]`` (a deep copy runs it, in eval mode)."""
    m = copy.deepcopy(_unwrap(model)).eval()
    tapped = TappedModel(m, list(stage_layers(m)))
    _, feats = tapped(sample)
    return {n: tuple(f.shape) for n, f in zip(tapped.names, feats, strict=True)}


def match_pairs(
    student: nn.Module, teacher: nn.Module, sample: torch.Tensor, pairs: str | list[str] = "auto"
) -> list[tuple[str, str]]:
    """Layer pairs ``[(student stage, teacher stage), ...]`` in student order.

    ``"auto"``: equal stage counts pair one to one in order; otherwise stages are paired by spatial
    resolution (the last stage of each resolution both models have). An explicit list holds
    ``"student:teacher"`` names (``"name"`` alone: the same name on both sides). Channel counts may differ;
    spatial sizes may differ too (the attention loss pools the larger map).
    """
    s_shapes = stage_shapes(student, sample)
    t_shapes = stage_shapes(teacher, sample)
    if pairs == "auto":
        s_names, t_names = list(s_shapes), list(t_shapes)
        if len(s_names) == len(t_names):
            return list(zip(s_names, t_names, strict=True))
        s_by_res = {_spatial(s_shapes[n], True): n for n in s_names}
        t_by_res = {_spatial(t_shapes[n], False): n for n in t_names}
        out = [(s_by_res[r], t_by_res[r]) for r in s_by_res if r in t_by_res]
        if not out:
            raise ValueError(
                f"pairs='auto' found no student and teacher stages with the same resolution (student "
                f"{s_shapes}, teacher {t_shapes}); pass pairs explicitly as 'student_stage:teacher_stage'"
            )
        return sorted(out, key=lambda st: s_names.index(st[0]))
    out = []
    for item in pairs:
        s, _, t = item.partition(":")
        t = t or s
        if s not in s_shapes:
            raise ValueError(f"pairs: unknown student stage {s!r} in {item!r}; student stages: {list(s_shapes)}")
        if t not in t_shapes:
            raise ValueError(f"pairs: unknown teacher stage {t!r} in {item!r}; teacher stages: {list(t_shapes)}")
        out.append((s, t))
    return out


def parameters_reaching(model: nn.Module, stage: str, sample: torch.Tensor) -> set[str]:
    """Names of the parameters the output of ``stage`` depends on ("the student up to that block").

    Found from the autograd graph of one forward of a deep copy (values do not matter, only which
    parameters are connected), so the model, its statistics and every RNG are left untouched.
    """
    m = copy.deepcopy(_unwrap(model)).eval()
    tapped = TappedModel(m, [stage])
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        _, (feat,) = tapped(sample)
        grads = torch.autograd.grad(feat.float().sum(), [p for _, p in named], allow_unused=True)
    return {n for (n, _), g in zip(named, grads, strict=True) if g is not None}
