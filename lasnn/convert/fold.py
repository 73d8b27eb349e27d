"""Batch-norm folding: ``BN(conv(x))`` -> ``conv'(x)`` with the eval-mode statistics baked into the weights.

``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β``, ``σ = sqrt(running_var + eps)`` (per output channel). Exact
in eval mode up to float rounding. Pairs are found on the model's ``torch.fx`` graph (a BN whose only
input is a Conv/Linear module called once, whose output feeds only that BN), so unmodified forward code
(torchvision ResNet/VGG, the zoo) is handled without a hand-written model walker; models that fx cannot
trace fall back to adjacent ``(conv, bn)`` children of ``nn.Sequential`` containers. A BN left unfolded
is still exact in a converted SNN: in eval mode it is a per-channel affine map applied at every step.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import nn
from torch.nn.utils import fusion

__all__ = ["fold_batchnorm"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # any tracing failure (data-dependent control flow, ...) -> fallback
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if not isinstance(modules.get(src.target), _FOLDABLE) or len(src.users) != 1:
            continue
        # A module called at several places would have one set of weights for several BNs.
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in itertools.pairwise(names):
            if isinstance(mod._modules[a], _FOLDABLE) and isinstance(mod._modules[b], _BN):
                pairs.append((f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b))
    return pairs


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    # torch.nn.utils.fusion's formulas, evaluated in float64 and rounded once to the layer's dtype
    w = layer.weight
    d = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    mean = d(bn.running_mean)
    bn_w = d(bn.weight) if bn.affine else torch.ones_like(mean)
    bn_b = d(bn.bias) if bn.affine else torch.zeros_like(mean)
    fuse = fusion.fuse_linear_bn_weights if isinstance(layer, nn.Linear) else fusion.fuse_conv_bn_weights
    new_w, new_b = fuse(d(w), d(layer.bias), mean, d(bn.running_var), bn.eps, bn_w, bn_b)
    layer.weight.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.detach().to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b.to(w.dtype))


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every batch norm that directly follows a conv/linear layer into that layer (eval-mode statistics).

    Args:
        model: an ANN (any forward code fx can trace; otherwise only ``nn.Sequential`` neighbours fold).
        inplace: modify ``model`` itself instead of a deep copy.
    Returns:
        ``(folded_model, pairs)``: the model in eval mode with each folded BN replaced by ``nn.Identity``
        (the module classes and names are otherwise unchanged), and the ``(layer, bn)`` names folded.
        Batch norms without running statistics (``track_running_stats=False``) or not preceded by a
        conv/linear are left in place (still exact in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    pairs = _pairs_fx(out)
    if pairs is None:
        pairs = _pairs_sequential(out)
        if any(isinstance(m, _BN) for m in out.modules()):
            warnings.warn(
                "fold_batchnorm: torch.fx could not trace the model; folded only (conv, bn) neighbours inside "
                "nn.Sequential containers (unfolded BNs stay exact in eval mode)",
                stacklevel=2,
            )
    done = []
    for lname, bname in pairs:
        layer, bn = out.get_submodule(lname), out.get_submodule(bname)
        if bn.running_mean is None or bn.running_var is None:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        _fold_into(layer, bn)
        _set_module(out, bname, nn.Identity())
        done.append((lname, bname))
    return out, done
