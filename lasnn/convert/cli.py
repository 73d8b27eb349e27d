"""``lasnn convert``, ``lasnn evaluate`` and ``lasnn demo`` (registered by ``lasnn.cli``)."""

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
                    data_dir=args.data_dir, device=args.device, quiet=args.quiet)
    except _errors() as e:
        print(f"lasnn convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lasnn.convert.pipeline import evaluate_run

    try:
        evaluate_run(args.run, T_max=args.T_max, out=args.out, data_dir=args.data_dir, device=args.device,
                     quiet=args.quiet)
    except _errors() as e:
        print(f"lasnn evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lasnn.convert.pipeline import run_demo

    kw = {}
    if args.quick:  # the test suite's reduced mode: tiny data set, a couple of epochs, short sweep
        kw = {"teacher_epochs": 6, "student_epochs": 6, "stage_epochs": 1}
    for k in ("teacher_epochs", "student_epochs"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    try:
        run_demo(args.out, dataset=args.dataset, data_dir=args.data_dir, T_max=args.T_max, seed=args.seed,
                 device=args.device, quiet=args.quiet, **kw)
    except _errors() as e:
        print(f"lasnn demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert``, ``evaluate`` and ``demo`` to the ``lasnn`` command line."""
    from lasnn.convert.convert import METHODS
    from lasnn.data import DATASETS

    p = subparsers.add_parser(
        "convert", help="ANN-to-SNN conversion of a teacher run, accuracy for every T = 1..T_max",
        description="Convert a train-teacher run's ANN to IF neurons (BN folded, one threshold per layer) and "
        "sweep T = 1..T_max in one simulation; writes OUT/accuracy_vs_T.json and OUT/accuracy_vs_T.png.",
    )
    p.add_argument("--teacher", required=True, help="train-teacher run folder (or its checkpoint)")
    p.add_argument("--method", choices=METHODS, default="robust",
                   help="thresholds: robust (percentile, default), max (classic), qcfs (QCFS fine-tune, clips)")
    p.add_argument("--T-max", dest="T_max", type=_positive_int, default=256, help="longest latency (default 256)")
    p.add_argument("--percentile", type=float, default=99.9, help="robust: percentile of activations (default 99.9)")
    p.add_argument("--initial-membrane", dest="initial_membrane", type=float, default=0.5,
                   help="initial membrane as a fraction of the threshold (default 0.5; 0 = classic)")
    p.add_argument("--levels", type=_positive_int, default=4, help="qcfs: quantisation levels L (default 4)")
    p.add_argument("--qcfs-epochs", dest="qcfs_epochs", type=int, default=5,
                   help="qcfs: fine-tuning epochs of a ReLU teacher (default 5)")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="data folder (default: the run's)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser(
        "evaluate", help="accuracy of a run over T (student SNN) or of the ANN (teacher)",
        description="Accuracy of a train-teacher or distill run on its test set; for an SNN, every T = 1..T_max "
        "from one simulation. Writes accuracy_vs_T.json (and .png) to --out (default: the run folder).",
    )
    p.add_argument("--run", required=True, help="run folder (or checkpoint)")
    p.add_argument("--T-max", dest="T_max", type=_positive_int, default=None,
                   help="longest latency (default: 4x the run's T)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="data folder (default: the run's)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser(
        "demo", help="the paper's comparison in one command: LaSNN student vs converted SNNs (latency)",
        description="Train a teacher ANN, distil a small SNN student at T=4 (layer-wise), convert the teacher with "
        "the classic (max, membrane 0) and robust (99.9th percentile, membrane θ/2) recipes, sweep T = 1..T_max; "
        "print a table and write OUT/report.json and OUT/latency.png.",
    )
    p.add_argument("--out", required=True, help="output folder (must not hold a demo yet)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist1d",
                   help="mnist1d (default), digits; cifar10/cifar100/tinyimagenet with --data-dir (GPU advised)")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="data folder for the file-based data sets")
    p.add_argument("--T-max", dest="T_max", type=_positive_int, default=256, help="longest latency (default 256)")
    p.add_argument("--teacher-epochs", dest="teacher_epochs", type=_positive_int, default=None,
                   help="override the data set's teacher epochs")
    p.add_argument("--student-epochs", dest="student_epochs", type=_positive_int, default=None,
                   help="override the data set's student epochs")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # reduced mode for the test suite
    p.set_defaults(func=_cmd_demo)
