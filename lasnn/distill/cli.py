"""``lasnn train-teacher``, ``lasnn train-snn`` and ``lasnn distill`` (registered by ``lasnn.cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

__all__ = ["register"]

# Every option defaults to SUPPRESS: the namespace then holds only what the user typed, which is what
# --resume compares against the run's config.json (and the config dataclass supplies the defaults).
_S = argparse.SUPPRESS


def _d(name: str) -> str:
    """The config dataclasses' default of field ``name``, for help texts (never restated by hand)."""
    from lasnn.distill.config import DistillConfig

    v = {f.name: f.default for f in dataclasses.fields(DistillConfig)}[name]
    return f"{v:g}" if isinstance(v, float) else str(v)


def _beta_help() -> str:
    from lasnn.distill.config import _SMALL_DATA_BETA, DEFAULT_BETA

    big = "/".join(sorted(DEFAULT_BETA))
    vals = {f"{v:g}" for v in DEFAULT_BETA.values()}
    return (f"weight of each attention loss (default: {'/'.join(sorted(vals))} for {big} as in the paper, "
            f"{_SMALL_DATA_BETA:g} for the small built-in data sets, whose tiny maps make the loss larger)")


def _kd_weight_help() -> str:
    from lasnn.distill.config import _KD_WEIGHT, DEFAULT_KD_WEIGHT

    per = ", ".join(f"{v:g} for {k}" for k, v in sorted(DEFAULT_KD_WEIGHT.items()))
    return (f"weight of the KD term (default: {per}, {_KD_WEIGHT:g} elsewhere; weight 1 at temperature 4 can "
            "collapse a small spiking student whose logits cannot reach the teacher's scale)")


def _common(p: argparse.ArgumentParser) -> None:
    from lasnn.data import DATASETS

    p.add_argument("--dataset", choices=sorted(DATASETS), default=_S,
                   help="data set (default " + _d("dataset") + "; cifar10/cifar100/tinyimagenet need --data-dir)")
    p.add_argument("--data-dir", dest="data_dir", default=_S,
                   help="folder holding the data set files (never downloaded)")
    p.add_argument("--out", required=True, help="run folder: config.json, metrics.jsonl, last.pt, best.pt, curves.png")
    p.add_argument("--epochs", type=int, default=_S, help=f"epochs in total (default {_d('epochs')})")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=_S,
                   help=f"batch per process (default {_d('batch_size')})")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=_S,
                   help=f"sgd (momentum, L2 weight decay) or adamw (decoupled weight decay); default {_d('optimizer')}")
    p.add_argument("--lr", type=float, default=_S, help=f"initial learning rate, cosine to 0 (default {_d('lr')})")
    p.add_argument("--momentum", type=float, default=_S,
                   help=f"SGD momentum (default {_d('momentum')}; unused by adamw)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=_S,
                   help=f"weight decay (default {_d('weight_decay')})")
    p.add_argument("--width", type=float, default=_S, help="channel width multiplier of the model (default 1)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=_S,
                   help="no training augmentation (random crop/flip per data set)")
    p.add_argument("--seed", type=int, default=_S,
                   help=f"seed of weights, data order and augmentation (default {_d('seed')})")
    p.add_argument("--save-every", dest="save_every", type=int, default=_S,
                   help=f"also checkpoint every N steps inside an epoch (default {_d('save_every')}; 0: at epoch ends)")
    p.add_argument("--grad-clip", dest="grad_clip", type=float, default=_S,
                   help=f"clip the global gradient norm to this value (default {_d('grad_clip')}; 0: off)")
    p.add_argument("--mixup", type=float, default=_S,
                   help=f"mixup with weights from Beta(a, a) per batch (default {_d('mixup')}: off); a distillation "
                        "run shows the teacher the same mixed batch")
    p.add_argument("--device", default=_S, help=f"auto, cpu, cuda or cuda:N (default {_d('device')})")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=_S, help="no bf16 autocast on GPU")
    p.add_argument("--cpu-amp", dest="cpu_amp", action="store_true", default=_S,
                   help="bf16 autocast on a CPU too (fast where it computes bf16 natively: AVX512-BF16 or AMX; "
                        "`lasnn info` says whether this one does)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_true", default=_S,
                        help="2-d models and activations in channels-last memory order (default: on for image "
                             "data on a CPU, where it is faster)")
    layout.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=_S,
                        help="keep the default (contiguous) memory order")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "command", "out", "resume", "quiet"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _run(args: argparse.Namespace, fn) -> int:
    from lasnn.data import DatasetError

    try:
        res = fn(out=args.out, resume=args.resume, quiet=args.quiet, **_overrides(args))
    except (ValueError, TypeError, DatasetError) as e:
        print(f"lasnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    # Under torchrun every rank returns the (all-reduced) metrics; rank 0 reports them.
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        what = f"student {res['model']} (T={res['T']}, {res['schedule']})" if res["kind"] != "teacher" else (
            f"teacher {res['model']}")
        acc = res["test_acc"]
        print(f"{what} on {res['dataset']}: test accuracy {acc:.4f} (best {res['best_test_acc']:.4f})"
              + (f", firing rate {res['firing_rate']:.3f}" if res.get("firing_rate") is not None else "")
              + f", {res['seconds']:.1f} s -> {res['out']}")
    return 0


def _cmd_teacher(args: argparse.Namespace) -> int:
    from lasnn.distill.trainer import train_teacher

    return _run(args, train_teacher)


def _cmd_snn(args: argparse.Namespace) -> int:
    from lasnn.distill.trainer import train_snn

    return _run(args, train_snn)


def _snn_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", default=_S, help="zoo model name of the student (default per data set)")
    p.add_argument("--T", dest="T", type=int, default=_S, help=f"time steps of the student (default {_d('T')})")
    p.add_argument("--encoding", choices=["direct", "poisson"], default=_S,
                   help=f"input encoding (default {_d('encoding')})")
    p.add_argument("--per-step-loss", dest="per_step_loss", action="store_true", default=_S,
                   help="cross-entropy (and KD) averaged over the per-step logits instead of taken on their mean "
                        "(temporal efficient training)")
    p.add_argument("--low-memory", dest="low_memory", choices=["off", "bits", "recompute", "recompute_all"],
                   default=_S, help="what the training forward saves for the backward (same gradients at every "
                                    f"level; less memory, more recomputation from left to right; default "
                                    f"{_d('low_memory')}): see `lasnn info`")


def _cmd_distill(args: argparse.Namespace) -> int:
    from lasnn.distill.trainer import distill

    if isinstance(getattr(args, "pairs", None), str) and args.pairs != "auto":
        args.pairs = [s.strip() for s in args.pairs.split(",") if s.strip()]
    return _run(args, distill)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train-teacher`` and ``distill`` to the ``lasnn`` command line."""
    p = subparsers.add_parser(
        "train-teacher", help="train an ANN teacher from the model zoo",
        description="Train an ANN teacher (zoo model; default per data set) with SGD + cosine schedule.",
    )
    _common(p)
    p.add_argument("--model", default=_S, help="zoo model name (see `lasnn models`; default per data set)")
    p.set_defaults(func=_cmd_teacher)

    p = subparsers.add_parser(
        "train-snn", help="train the spiking student directly, no teacher (the baseline distillation must beat)",
        description="Direct SNN training: the student spikify'd at T steps, surrogate-gradient BPTT, cross-entropy "
                    "on the T-averaged logits; same run folder, resume and DDP as distill.",
    )
    _common(p)
    _snn_options(p)
    p.set_defaults(func=_cmd_snn)

    p = subparsers.add_parser(
        "distill", help="distil a spiking student from a trained teacher (LaSNN)",
        description="LaSNN: train a small SNN student from an ANN teacher with layer-wise attention-map "
                    "distillation and logit KD. Loss: CE + kd-weight * KD + beta * sum of attention losses.",
    )
    _common(p)
    p.add_argument("--teacher", default=_S, help="teacher run folder (uses best.pt) or checkpoint file")
    _snn_options(p)
    p.add_argument("--schedule", choices=["layerwise", "joint"], default=_S,
                   help="layerwise: one attention stage per pair, then all terms; joint: all terms (default "
                        + _d("schedule") + ")")
    p.add_argument("--pairs", default=_S,
                   help="'auto' (match stages by order/resolution) or a list 'sstage:tstage,...' (default "
                        + _d("pairs") + ")")
    p.add_argument("--beta", type=float, default=_S,
                   help=_beta_help())
    p.add_argument("--p", dest="p", type=float, default=_S, help=f"attention map exponent (default {_d('p')})")
    p.add_argument("--time-reduce", dest="time_reduce", choices=["mean", "per_step"], default=_S,
                   help=f"student map from the firing rate (mean) or per time step (default {_d('time_reduce')})")
    p.add_argument("--kd-temperature", dest="kd_temperature", type=float, default=_S,
                   help=f"KD temperature (default {_d('kd_temperature')})")
    p.add_argument("--kd-weight", dest="kd_weight", type=float, default=_S,
                   help=_kd_weight_help())
    p.add_argument("--stage-epochs", dest="stage_epochs", type=int, default=_S,
                   help="layerwise: epochs per attention stage (default max(1, epochs // (2 * pairs)))")
    p.add_argument("--earlier", choices=["freeze", "lr"], default=_S,
                   help="layerwise: earlier blocks frozen or trained at --earlier-lr-scale x lr (default "
                        + _d("earlier") + ")")
    p.add_argument("--earlier-lr-scale", dest="earlier_lr_scale", type=float, default=_S,
                   help=f"learning-rate factor of earlier blocks with --earlier lr (default {_d('earlier_lr_scale')})")
    p.add_argument("--no-final-attention", dest="final_attention", action="store_false", default=_S,
                   help="layerwise: final stage on CE + KD only (default: attention kept)")
    p.set_defaults(func=_cmd_distill)
