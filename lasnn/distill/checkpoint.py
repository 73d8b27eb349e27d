"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with ``weights_only=True``.

A checkpoint never pickles Python objects: model/optimizer state dicts, RNG states as uint8/int64
tensors, the run config as a dict of primitives. ``torch.load(weights_only=True)`` can therefore read it
without executing code, and a file from another program (or a truncated one) fails with a
``CheckpointError`` that says what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lasnn.files import atomic_write, atomic_write_text

__all__ = ["FORMAT", "VERSION", "CheckpointError", "atomic_write_text", "load_checkpoint", "save_checkpoint"]

FORMAT = "lasnn-run"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, from another program/version, or does not fit the request."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, state dicts, primitives only) atomically, tagged with format and version."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``.

    Raises:
        CheckpointError: missing file, unreadable/corrupt file, something that needs unpickling of code
            (not ours), another format or a newer version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects refused by weights_only
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a lasnn checkpoint (torch.load(weights_only=True) "
            f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a lasnn run checkpoint (no format={FORMAT!r} tag)")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {ckpt.get('version')!r}; this lasnn "
                              f"reads versions <= {VERSION}")
    for key in ("kind", "config", "model_state"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the {key!r} entry")
    return ckpt


# ------------------------------------------------------------------ generators owned by modules


def module_generator_states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """States of the private generators some modules own (``PoissonEncoder``), keyed ``module/device``.

    Those streams are not part of ``state_dict`` but decide the spikes a seeded encoder draws, so an
    exact resume must restore them.
    """
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        gens = getattr(m, "_generators", None)
        if isinstance(gens, dict):
            for dev, g in gens.items():
                if isinstance(g, torch.Generator):
                    out[f"{name}|{dev}"] = g.get_state()
    return out


def set_module_generator_states(model: torch.nn.Module, states: dict[str, torch.Tensor]) -> None:
    """Restore what ``module_generator_states`` captured (creating the generators as needed)."""
    modules = dict(model.named_modules())
    for key, st in states.items():
        name, dev = key.rsplit("|", 1)
        m = modules.get(name)
        gens = getattr(m, "_generators", None)
        if not isinstance(gens, dict):
            raise CheckpointError(f"checkpoint holds a generator state for module {name!r}, which has none")
        g = gens.get(dev)
        if g is None:
            g = torch.Generator(device=dev)
            gens[dev] = g
        g.set_state(st.cpu() if g.device.type == "cpu" else st)
