"""``lasnn models``: list the model zoo (names, parameters, input shape, stages) and the default pairs."""

from __future__ import annotations

import argparse


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from lasnn import models

    print(f"{'name':<18} {'params':>9}  {'input':<11} {'stages (shape of one sample)':<s}")
    for name in models.list_models():
        info = models.model_info(name)
        # on the meta device: shapes and counts only, no memory and no weight init (instant for VGG-16)
        with torch.device("meta"):
            m = models.create(name, num_classes=args.num_classes, width=args.width).eval()
        n = sum(p.numel() for p in m.parameters())
        if args.shapes:
            with torch.device("meta"), torch.no_grad():
                feats = models.features(m, torch.zeros(1, *info.input_shape))
            stages = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in feats.items())
        else:
            stages = ", ".join(models.stage_layers(m))
        count = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
        print(f"{name:<18} {count:>9}  {'x'.join(map(str, info.input_shape)):<11} {stages}")
        print(f"{'':<18} {'':>9}  {info.description}")
    print("\ndefault (teacher, student) per data set:")
    for ds, (t, s, c, shape) in models.DEFAULT_PAIRS.items():
        print(f"  {ds:<13} {t} -> {s}   ({c} classes, input {'x'.join(map(str, shape))})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command to the ``lasnn`` CLI."""
    p = subparsers.add_parser("models", help="list the model zoo and the default teacher/student pairs")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier used for the parameter counts")
    p.add_argument("--num-classes", type=int, default=10, help="classifier size used for the parameter counts")
    p.add_argument("--shapes", action="store_true", help="run one zero input to show each stage's shape")
    p.set_defaults(func=_cmd_models)
