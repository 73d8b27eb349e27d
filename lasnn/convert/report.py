"""Latency-curve reporting shared by ``lasnn convert``, ``lasnn evaluate`` and ``lasnn demo``: matching T,
JSON-friendly curves, the printed table and the accuracy-vs-time-steps plot."""

from __future__ import annotations

import json
import os
from typing import Any

from lasnn.files import atomic_write, atomic_write_text

__all__ = ["curve_to_json", "format_table", "plot_latency", "t_to_match", "write_json"]

# Accuracies are fractions correct/total over the same test set; this only absorbs float rounding.
_EPS = 1e-9


def t_to_match(curve: dict[int, float], target: float) -> int | None:
    """Smallest T whose accuracy is at least ``target`` (None if no T in the curve reaches it)."""
    for t in sorted(curve):
        if curve[t] >= target - _EPS:
            return t
    return None


def curve_to_json(curve: dict[int, float]) -> dict[str, float]:
    """``{T: acc}`` -> ``{"T": acc}`` (JSON object keys are strings), T ascending, values exact."""
    return {str(t): float(curve[t]) for t in sorted(curve)}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (``lasnn.files.atomic_write_text``)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _table_ts(t_max: int) -> list[int]:
    ts = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    return [t for t in ts if t <= t_max] + ([t_max] if t_max not in ts else [])


def format_table(curves: dict[str, dict[int, float]], *, reference: dict[str, float] | None = None) -> str:
    """A fixed-width table: one row per T (powers of two up to the longest curve), one column per curve.

    ``reference``: constant accuracies shown as extra columns (e.g. the teacher ANN). Missing T: ``-``.
    """
    reference = reference or {}
    t_max = max((max(c) for c in curves.values() if c), default=1)
    names = list(curves) + list(reference)
    width = max(10, *(len(n) + 2 for n in names))
    lines = [f"{'T':>5}" + "".join(f"{n:>{width}}" for n in names)]
    for t in _table_ts(t_max):
        row = f"{t:>5}"
        for n in curves:
            row += f"{curves[n][t] * 100:>{width - 1}.2f}%" if t in curves[n] else f"{'-':>{width}}"
        for n in reference:
            row += f"{reference[n] * 100:>{width - 1}.2f}%"
        lines.append(row)
    return "\n".join(lines)


def plot_latency(
    path: str | os.PathLike,
    curves: dict[str, dict[int, float]],
    *,
    teacher_acc: float | None = None,
    points: dict[str, tuple[int, float]] | None = None,
    title: str = "",
) -> None:
    """Accuracy vs time steps (log-scale T) for each curve, the teacher ANN as a horizontal line, and
    marked points (e.g. the student at its training T). Written atomically as PNG."""
    # A bare Figure (Agg canvas): pyplot's global state and the caller's backend stay untouched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, c in curves.items():
        ts = sorted(c)
        ax.plot(ts, [100 * c[t] for t in ts], label=name, lw=1.6)
    for name, (t, acc) in (points or {}).items():
        ax.plot([t], [100 * acc], marker="*", ms=14, ls="none", label=name, zorder=5)
    if teacher_acc is not None:
        ax.axhline(100 * teacher_acc, color="k", ls="--", lw=1, label=f"teacher ANN ({100 * teacher_acc:.2f}%)")
    ax.set_xscale("log", base=2)
    t_max = max((max(c) for c in curves.values() if c), default=1)
    ticks = [2**k for k in range(t_max.bit_length())]
    ax.set_xticks(ticks, [str(t) for t in ticks])  # plain step counts read better than 2^k
    ax.set_xlabel("time steps T (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
