"""Does distillation beat direct training? The ablation behind the README's table, rerunnable.

    python scripts/ablation.py --dataset mnist1d --seeds 0 1 2 --out runs/ablation-mnist1d
    python scripts/ablation.py --dataset fashionmnist --seeds 0 1 2 --recipes direct kd --out runs/abl-fm

One teacher (the demo's budget for the data set, seed 0), then every recipe with every seed at the
demo's student budget (epochs, batch size, T=4). Each run is an ordinary run folder under ``--out``; a
finished one is skipped, so an interrupted ablation continues where it stopped. Each result is appended to
``OUT/results.jsonl``; at the end a table of last-epoch test accuracy (mean, sample std, per seed) and the
paired gain over ``direct`` is printed. Extra settings for every recipe: ``--set key=value`` (e.g.
``--set lr=0.05``), which also goes into the recipe's name; distillation-only ones (``kd_weight``, ``beta``,
...) leave the direct baseline as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from lasnn.demo import DEMO_RECIPES
from lasnn.distill import SNNConfig, distill, load_run, train_snn, train_teacher

SNN_FIELDS = {f.name for f in dataclasses.fields(SNNConfig)}

# recipe name -> (trainer, settings); "teacher" is filled in for the distillation recipes
RECIPES = {
    "direct": ("snn", {}),
    "kd": ("distill", {"schedule": "joint", "beta": 0.0}),
    "kd_t1": ("distill", {"schedule": "joint", "beta": 0.0, "kd_temperature": 1.0}),
    "kd_t2": ("distill", {"schedule": "joint", "beta": 0.0, "kd_temperature": 2.0}),
    "kd_att": ("distill", {"schedule": "joint"}),
    "layerwise": ("distill", {"schedule": "layerwise", "stage_epochs": 1}),
}


def _value(s: str):
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(s.lower(), s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=["direct", "kd", "kd_att", "layerwise"], choices=sorted(RECIPES))
    p.add_argument("--set", dest="extra", action="append", default=[], help="key=value for every recipe")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    budget = DEMO_RECIPES[args.dataset]
    out = Path(args.out)
    extra = dict(kv.split("=", 1) for kv in args.extra)
    extra = {k: _value(v) for k, v in extra.items()}
    teacher = out / "teacher"
    if not (teacher / "best.pt").exists() or len(load_run(teacher, which="last").metrics) < budget.teacher_epochs:
        train_teacher(out=teacher, dataset=args.dataset, data_dir=args.data_dir, epochs=budget.teacher_epochs,
                      seed=0, quiet=True, resume=(teacher / "config.json").exists())
    common = {"dataset": args.dataset, "data_dir": args.data_dir, "T": args.T, "epochs": budget.student_epochs,
              "batch_size": budget.batch_size, "lr": budget.lr, "quiet": True}
    table: dict[str, dict[int, float]] = {}
    base_name = "direct"
    for name in args.recipes:
        kind, settings = RECIPES[name]
        # distillation-only settings (kd_weight, beta, ...) do not apply to the direct baseline, which is then
        # the same run for every such setting
        mine = extra if kind == "distill" else {k: v for k, v in extra.items() if k in SNN_FIELDS}
        suffix = "".join(f"-{k}{v}" for k, v in sorted(mine.items()))
        if kind == "snn":
            base_name = name + suffix
        for seed in args.seeds:
            run = out / f"{name}{suffix}-s{seed}"
            kw = {**common, **settings, **mine, "seed": seed}
            if kind == "distill":
                kw["teacher"] = str(teacher)
            if (run / "last.pt").exists() and len(load_run(run, which="last").metrics) >= budget.student_epochs:
                acc = load_run(run, which="last").metrics[-1]["test_acc"]
            else:
                resume = (run / "config.json").exists()
                fn = distill if kind == "distill" else train_snn
                acc = fn(out=run, resume=resume, **kw)["test_acc"]
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps({"recipe": name + suffix, "seed": seed, "test_acc": acc,
                                        **{k: v for k, v in kw.items() if k != "quiet"}}) + "\n")
            table.setdefault(name + suffix, {})[seed] = acc
            print(f"{name + suffix} seed {seed}: {100 * acc:.2f}%", flush=True)
    base = table.get(base_name)
    print(f"\n| recipe | {' | '.join(f'seed {s}' for s in args.seeds)} | mean ± std | gain over direct |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for name, accs in table.items():
        vals = [100 * accs[s] for s in args.seeds]
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
        gain = ""
        if base is not None and name != base_name:
            g = [100 * (accs[s] - base[s]) for s in args.seeds]
            gm = sum(g) / len(g)
            gse = (math.sqrt(sum((x - gm) ** 2 for x in g) / (len(g) - 1)) / math.sqrt(len(g))) if len(g) > 1 else 0
            gain = f"{gm:+.2f} ± {gse:.2f} (s.e.)"
        print(f"| {name} | {' | '.join(f'{v:.1f}' for v in vals)} | {m:.2f} ± {sd:.2f} | {gain} |")


if __name__ == "__main__":
    main()
