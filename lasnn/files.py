"""Atomic file writes, shared by the run folders (configs, metrics, checkpoints, curves) and the reports.

A file is written to a temporary in the same folder, flushed and fsync'd, then renamed over the target:
readers (and a resume after kill -9 or a power cut) see either the old file or the complete new one,
never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` atomically by what ``write(f)`` writes to the binary file ``f`` (parents created)."""
    if not callable(write):
        raise TypeError(f"write must be a callable taking a binary file, got {type(write).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder: os.replace is then a rename on one file system
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` atomically by ``text`` (UTF-8)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    atomic_write(path, lambda f: f.write(text.encode()))
