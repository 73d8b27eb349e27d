"""``lasnn convert`` and ``lasnn evaluate`` (registered by ``lasnn.cli``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def _errors():
    from lasnn.data import DatasetError

    return (ValueError, TypeError, FileNotFoundError, DatasetError)


def _cmd_convert(args: argparse.Namespace) -> int:
    from lasnn.convert.pipeline import convert_run

    try:
        convert_run(args.teacher, args.out, method=args.method, T_max=args.T_max, percentile=args.percentile,
                    initial_membrane=args.initial_membrane, levels=args.levels, qcfs_epochs=args.qcfs_epochs,
                    data_dir=args.data_dir, device=args.device, which=args.which, quiet=args.quiet)
    except _errors() as e:
        print(f"lasnn convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lasnn.convert.pipeline import evaluate_run

    try:
        evaluate_run(args.run, T_max=args.T_max, out=args.out, data_dir=args.data_dir, device=args.device,
                     which=args.which, quiet=args.quiet)
    except _errors() as e:
        print(f"lasnn evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1 (shared by the convert, evaluate and demo commands)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``evaluate`` to the ``lasnn`` command line."""
    from lasnn.convert.convert import METHODS

    p = subparsers.add_parser(
        "convert", help="ANN-to-SNN conversion of a teacher run, accuracy for every T = 1..T_max",
        description="Convert a train-teacher run's ANN to IF neurons (BN folded, one threshold per layer) and "
        "sweep T = 1..T_max in one simulation; writes OUT/accuracy_vs_T.json and OUT/accuracy_vs_T.png.",
    )
    p.add_argument("--teacher", required=True, help="train-teacher run folder (or its checkpoint)")
    p.add_argument("--method", choices=METHODS, default="robust",
                   help="thresholds: robust (percentile, default), max (classic), qcfs (QCFS fine-tune, clips)")
    p.add_argument("--T-max", dest="T_max", type=positive_int, default=256,
                   help="longest latency (default %(default)s)")
    p.add_argument("--percentile", type=float, default=99.9,
                   help="robust: percentile of activations (default %(default)s)")
    p.add_argument("--initial-membrane", dest="initial_membrane", type=float, default=0.5,
                   help="initial membrane as a fraction of the threshold (default %(default)s; 0 = classic)")
    p.add_argument("--levels", type=positive_int, default=4, help="qcfs: quantisation levels L (default %(default)s)")
    p.add_argument("--qcfs-epochs", dest="qcfs_epochs", type=int, default=5,
                   help="qcfs: fine-tuning epochs of a ReLU teacher (default %(default)s)")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="data folder (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--which", choices=("best", "last"), default="best",
                   help="the run's checkpoint: best (highest test accuracy, the SNN literature's convention; "
                        "default) or last (no selection on the test set; what lasnn demo reports)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser(
        "evaluate", help="accuracy of a run over T (student SNN) or of the ANN (teacher)",
        description="Accuracy of a train-teacher or distill run on its test set; for an SNN, every T = 1..T_max "
        "from one simulation. Writes accuracy_vs_T.json (and .png) to --out (default: the run folder).",
    )
    p.add_argument("--run", required=True, help="run folder (or checkpoint)")
    p.add_argument("--T-max", dest="T_max", type=positive_int, default=None,
                   help="longest latency (default: 4x the run's T)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="data folder (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--which", choices=("best", "last"), default="best",
                   help="the run's checkpoint: best (highest test accuracy, the SNN literature's convention; "
                        "default) or last (no selection on the test set; what lasnn demo reports)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_cmd_evaluate)
