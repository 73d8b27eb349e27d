"""One-pass latency curve: accuracy at every T = 1..T_max from a single simulation of T_max steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lasnn.convert.report import t_to_match

__all__ = ["accuracy_vs_timesteps", "stepper", "sweep_horizons"]


def _batch_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise TypeError(f"loader must yield (x, y) batches, got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"loader must yield (x, y) tensors, got ({type(x).__name__}, {type(y).__name__})")
    return x, y


@contextlib.contextmanager
def stepper(snn: nn.Module) -> Iterator[tuple[Callable[[], None], Callable[[torch.Tensor, int], torch.Tensor]]]:
    """Context yielding ``(reset, simulate)`` for an SNN that can run a long sequence in chunks.

    ``simulate(x [B, *], steps) -> per-step logits [steps, B, classes]`` continues from the membranes
    left by the previous call; ``reset()`` starts a new sequence. Supported: any ``lasnn.spikify`` SNN
    (converted by ``lasnn.convert`` or distilled; through its ``streaming()`` mode, with ``x`` encoded to
    ``steps`` more steps each call) and any module with its own ``reset()`` and ``simulate(x, steps)``.
    """
    from lasnn.nn.spikify import SNN

    if isinstance(snn, SNN):
        T0 = snn.T

        def simulate(x: torch.Tensor, steps: int) -> torch.Tensor:
            snn.T = steps
            return snn(x, return_steps=True)

        try:
            with snn.streaming():
                yield snn.reset_state, simulate
        finally:
            snn.T = T0
        return
    reset = getattr(snn, "reset", None)
    sim = getattr(snn, "simulate", None)
    if not (callable(reset) and callable(sim)):
        raise TypeError(
            f"snn ({type(snn).__name__}) cannot stream: accuracy_vs_timesteps needs a lasnn.spikify SNN or a module "
            "with reset() and simulate(x, steps) -> per-step logits [steps, B, classes] carrying its state"
        )
    yield reset, sim


_CPU_CHUNK_SAMPLES = 1024  # steps x batch per call on a CPU (see accuracy_vs_timesteps' chunk)
_MAX_CHUNK = 32


def _auto_chunk(x: torch.Tensor) -> int:
    if x.device.type != "cpu":
        return _MAX_CHUNK
    return max(1, min(_MAX_CHUNK, _CPU_CHUNK_SAMPLES // x.shape[0]))


def _correct_by_step(
    simulate: Callable, x: torch.Tensor, y: torch.Tensor, start: int, stop: int, chunk: int,
    acc_logits: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps ``start..stop-1`` of this batch (the SNN continues from its step ``start``): correct predictions
    after ``start+1..stop`` steps (``[stop - start]`` int64) and the running float64 logit sum after step ``stop``
    (``acc_logits``: the sum after step ``start``, None at step 0)."""
    correct = torch.zeros(stop - start, dtype=torch.int64)
    for t0 in range(start, stop, chunk):
        steps = min(chunk, stop - t0)
        out = simulate(x, steps)  # [steps, B, classes]
        if out.dim() != 3 or out.shape[0] != steps or out.shape[1] != x.shape[0]:
            raise RuntimeError(
                f"simulate(x, {steps}) must return per-step logits [{steps}, {x.shape[0]}, classes], "
                f"got shape {tuple(out.shape)}"
            )
        # float64 running sums: hundreds of steps of fp32 logits would otherwise drift
        cum = out.double().cumsum(0)
        if acc_logits is not None:
            cum += acc_logits
        correct[t0 - start : t0 - start + steps] = (cum.argmax(-1) == y.unsqueeze(0)).sum(1).cpu()
        acc_logits = cum[-1]
    return correct, acc_logits


HORIZON_STEP = 32  # horizons double up to this, then grow by it


def sweep_horizons(T_max: int) -> list[int]:
    """The horizons at which ``accuracy_vs_timesteps(stop_at=...)`` checks whether to stop: 1, 2, 4, ... doubling up
    to 32, then every 32 steps (64, 96, 128, ...), and ``T_max`` last. A sweep that matches at ``T`` thus stops at
    the first horizon ``H >= T``: ``H < 2·T`` below 32 steps, ``H < T + 32`` above."""
    if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
        raise ValueError(f"T_max must be an int >= 1, got {T_max!r}")
    hs, h = [], 1
    while h < T_max:
        hs.append(h)
        h = 2 * h if h < HORIZON_STEP else h + HORIZON_STEP
    return [*hs, T_max]


def _state_access(snn: nn.Module) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """``(save, load)`` of the carried membranes of a streaming SNN (``stop_at`` advances batches in turns)."""
    save, load = getattr(snn, "stream_state", None), getattr(snn, "load_stream_state", None)
    if not (callable(save) and callable(load)):
        raise TypeError(
            f"stop_at needs an SNN whose carried state can be saved and restored: a lasnn.spikify SNN or a module "
            f"with stream_state() and load_stream_state(state); {type(snn).__name__} has not (use stop_at=None)"
        )
    return save, load


def _check_accuracy(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"stop_at must be None, an accuracy in [0, 1] or a function returning one (or None), "
                         f"got {v!r}")
    return float(v)


@torch.no_grad()
def accuracy_vs_timesteps(
    snn: nn.Module,
    loader: Iterable,
    T_max: int = 256,
    *,
    chunk: int | None = None,
    device: torch.device | str | None = None,
    stop_at: float | Callable[[], float | None] | None = None,
    on_horizon: Callable[[int], None] | None = None,
) -> dict[int, float]:
    """Top-1 accuracy after every number of time steps ``T = 1..T_max``, from ONE simulation of ``T_max`` steps.

    Per batch the SNN runs ``T_max`` steps in chunks of ``chunk`` (membranes carried across chunks via
    ``simulate``/``reset``); the per-step logits are accumulated step by step, and the prediction after
    ``T`` steps is the argmax of the sum of the first ``T`` (the same as of their mean, which is what a
    separate ``T``-step run outputs). So the whole curve costs one ``T_max``-step run.

    With ``stop_at`` the simulation stops early, once the curve has reached that accuracy: all batches advance
    together through the horizons of ``sweep_horizons`` (1, 2, 4, ..., 32, 64, 96, ...; each batch's membranes and
    logit sums are kept between horizons), and after the first horizon ``H`` at which some ``T <= H`` has
    accuracy ``>= stop_at`` the curve ``T = 1..H`` is returned (``H < 2·T_match``, and ``H < T_match + 32``
    above 32 steps; ``T_max`` if never reached). Those values are exactly the full curve's; the cost is ``H``
    steps instead of ``T_max``. It holds every batch's state at once: the loader's
    batches, plus one ANN forward's activations per sample. ``stop_at`` may also be a function, asked at every
    horizon, returning the target or None while it is not known yet (the sweep then goes on): a sweep can start
    before what it is matched against has been measured (``lasnn demo`` runs it beside the students).

    Args:
        snn: a ``lasnn.spikify`` SNN (``lasnn.convert``'s ``ConvertedSNN``, a distilled student) or a module
            with ``reset()`` and ``simulate(x, steps)`` (see ``stepper``; for ``stop_at`` also
            ``stream_state()`` and ``load_stream_state(state)``).
        loader: iterable of ``(x [B, *], y [B])`` batches (integer class labels).
        T_max: the longest latency, an int >= 1.
        chunk: steps simulated per call (memory ~ chunk × one ANN forward of the batch); does not change the
            results. None: 32 on a GPU; on a CPU as many as keep ``chunk × batch`` at or below 1024 samples
            (at least 1, at most 32), because there every step then costs what one ANN forward of the
            batch costs, while 32 steps of a 500-sample batch run 3-4x slower than 32 separate steps
            (their tensors leave the caches and are mapped afresh each time).
        device: where to run (default: the SNN's parameters' device).
        stop_at: None (the whole curve), an accuracy in [0, 1] after which the sweep may stop (above), or a
            function returning such an accuracy or None (not known yet).
        on_horizon: called with ``H`` once every sample has run ``H`` steps (each horizon with ``stop_at``, else
            ``T_max``), e.g. to read spike counts over exactly the steps of a curve cut at ``H``.
    Returns:
        ``{T: accuracy in [0, 1]}`` for every ``T`` from 1 to ``T_max`` (to the stopping horizon with ``stop_at``).
    """
    if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
        raise ValueError(f"T_max must be an int >= 1, got {T_max!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")
    if stop_at is not None and not callable(stop_at):
        _check_accuracy(stop_at)
    if device is None:
        p = next(iter(snn.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    if stop_at is not None:
        save, load = _state_access(snn)
    was_training = snn.training
    snn.eval()
    correct = torch.zeros(T_max, dtype=torch.int64)
    total = 0
    try:
        with stepper(snn) as (reset, simulate):
            if stop_at is None:
                for batch in loader:
                    x, y = _batch_xy(batch)
                    if x.shape[0] == 0:
                        continue
                    x, y = x.to(device), y.to(device)
                    reset()
                    correct += _correct_by_step(simulate, x, y, 0, T_max, chunk or _auto_chunk(x), None)[0]
                    total += x.shape[0]
                    reset()
                horizon = T_max
                if on_horizon is not None and total:
                    on_horizon(horizon)
            else:
                batches = [(x.to(device), y.to(device)) for x, y in map(_batch_xy, loader) if x.shape[0] > 0]
                total = sum(x.shape[0] for x, _ in batches)
                states: list[Any] = [None] * len(batches)
                sums: list[torch.Tensor | None] = [None] * len(batches)
                done = horizon = 0
                for horizon in sweep_horizons(T_max) if total else []:
                    for i, (x, y) in enumerate(batches):
                        reset()
                        if states[i] is not None:
                            load(states[i])
                        c, sums[i] = _correct_by_step(simulate, x, y, done, horizon, chunk or _auto_chunk(x), sums[i])
                        correct[done:horizon] += c
                        states[i] = save()
                    reset()
                    if on_horizon is not None:
                        on_horizon(horizon)
                    if horizon == T_max:
                        break
                    target = stop_at() if callable(stop_at) else stop_at
                    if target is not None and t_to_match({t + 1: float(correct[t]) / total for t in range(horizon)},
                                                         _check_accuracy(target)) is not None:
                        break
                    done = horizon
    finally:
        snn.train(was_training)
    if total == 0:
        raise ValueError("loader yielded no (non-empty) batches: nothing to evaluate")
    return {t + 1: float(correct[t]) / total for t in range(horizon)}
