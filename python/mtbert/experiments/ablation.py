"""The ablation grid of the published study, rerun on our setup with several seeds.

Every configuration runs with the same budget and data; each (configuration,
seed) run lives in its own folder under `--out`, and a finished run (one with
summary.json) is never rerun, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ..mtl.methods import METHODS
from ..evaluation.plots import plot_ablation
from ..data.tasks import get_task
from ..config import TrainConfig
from ..training import train
from .compare import compare_runs, write_report

_BASE_HEADS = {"dropout_sst": 0.3, "dropout_para": 0.3, "dropout_sts": 0.3}
_FINAL = {"combine": "pcgrad"}  # the default heads are the published final architecture

# (name, overrides of the grid's base configuration), in the study's order.
SEED_GRID: list[tuple[str, dict]] = [
    ("sum of losses", {**_BASE_HEADS, "combine": "sum"}),
    ("PCGrad", {**_BASE_HEADS, "combine": "pcgrad"}),
    ("PCGrad + STS dropout 0.5", {**_BASE_HEADS, "combine": "pcgrad", "dropout_sts": 0.5}),
    ("+ L2 (STS head)", {**_BASE_HEADS, "combine": "pcgrad", "dropout_sts": 0.5, "reg": "l2"}),
    ("+ L1 (STS head)", {**_BASE_HEADS, "combine": "pcgrad", "dropout_sts": 0.5, "reg": "l1"}),
    ("+ L-inf (STS head)", {**_BASE_HEADS, "combine": "pcgrad", "dropout_sts": 0.5, "reg": "linf"}),
    ("+ extra linear layer per head", {**_BASE_HEADS, "combine": "pcgrad", "dropout_sts": 0.5,
                                       "extra_layers": 1}),
    ("+ SST and STS dropout 0.5", {**_BASE_HEADS, "combine": "pcgrad", "dropout_sst": 0.5,
                                   "dropout_sts": 0.5}),
    ("+ SMART (SST)", {**_BASE_HEADS, "combine": "pcgrad", "dropout_sts": 0.5, "smart_weight": 1.0,
                       "smart_tasks": ["sst"]}),
    ("final architecture", dict(_FINAL)),
    ("final, lr x2", {**_FINAL, "lr_scale": 2.0}),
    ("final, weight decay 0.01", {**_FINAL, "weight_decay": 0.01}),
    ("final, batch x2", {**_FINAL, "batch_scale": 2}),
    ("final + class weights", {**_FINAL, "class_weights": True}),
    ("final + LeakyReLU", {**_FINAL, "activation": "leakyrelu"}),
]

# Every multi-task method of mtbert.aggregation with its paper's default options, on the
# base configuration's heads: same budget, data and seeds for all (issue 13).
METHODS_GRID: list[tuple[str, dict]] = [(method, {"combine": method}) for method in METHODS]

GRIDS = {"seed": SEED_GRID, "methods": METHODS_GRID}

# Budget 1.0: each run takes this many steps on at most this many examples per task.
BASE_STEPS = 300
BASE_TRAIN_LIMIT = 4000


def slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in name)
    return "-".join(filter(None, keep.split("-")))


def run_config(base: TrainConfig, overrides: dict, seed: int, out: Path) -> TrainConfig:
    overrides = dict(overrides)
    lr = base.lr * overrides.pop("lr_scale", 1.0)
    batch = base.batch_size * overrides.pop("batch_scale", 1)
    return replace(base, **overrides, lr=lr, batch_size=batch, seed=seed, out=str(out))


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.array(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def headline(metrics: dict) -> dict[str, float]:
    return {t: m[get_task(t).headline_metric] for t, m in metrics.items()}


def run_grid(base: TrainConfig, *, grid: str = "seed", seeds: int = 3, budget: float = 1.0,
             out: Path, only: Optional[list[str]] = None) -> list[dict]:
    """Run every configuration of `grid` for `seeds` seeds; write ablation.md and ablation.png,
    and the paired comparison of every configuration with the sum of losses (compare.md,
    compare.json, compare.png; see compare.py)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; grids: {', '.join(GRIDS)}")
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    if budget <= 0:
        raise ValueError("budget must be > 0")
    configs = [(n, o) for n, o in GRIDS[grid] if only is None or slug(n) in only or n in only]
    if base.max_steps is None:
        base = replace(base, max_steps=max(1, int(round(BASE_STEPS * budget))))
    if base.train_limit is None:
        base = replace(base, train_limit=max(base.batch_size, int(round(BASE_TRAIN_LIMIT * budget))))
    base = replace(base, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, o, base.seed + s) for name, o in configs for s in range(seeds)]
    folders = {out / "runs" / f"{slug(name)}-seed{seed}": name for name, _, seed in jobs}
    results: dict[str, list[dict]] = {name: [] for name, _ in configs}
    with tqdm(total=len(jobs), desc="ablation", unit="run") as bar:
        for name, overrides, seed in jobs:
            run_dir = out / "runs" / f"{slug(name)}-seed{seed}"
            summary_path = run_dir / "summary.json"
            if not summary_path.is_file():  # finished runs are kept, not rerun
                bar.set_postfix_str(f"{name} seed {seed}")
                train(run_config(base, overrides, seed, run_dir))
            results[name].append(json.loads(summary_path.read_text(encoding="utf-8")))
            bar.update(1)

    rows = []
    for name, _ in configs:
        runs = results[name]
        dev = [headline(r["dev"]) for r in runs]
        trn = [headline(r.get("train", {})) for r in runs]
        row = {"name": name, "seeds": len(runs), "dev_mean": {}, "dev_std": {}, "train_mean": {},
               "train_std": {}}
        for key, table in (("dev", dev), ("train", trn)):
            for task in dev[0]:
                vals = [d[task] for d in table if task in d]
                if vals:
                    row[f"{key}_mean"][task], row[f"{key}_std"][task] = _stats(vals)
        row["overall_mean"], row["overall_std"] = _stats([r["overall"] for r in runs])
        rows.append(row)
    write_table(rows, out / "ablation.md", base, seeds, budget)
    plot_ablation(rows, out / "ablation.png")
    report = compare_runs(list(folders), data_dir=base.data_dir, names=folders)
    write_report(report, out, title=f"Ablation grid {grid!r}: each configuration against {report['baseline']}")
    return rows


def _cell(mean: Optional[float], std: float, seeds: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if seeds < 2 else f"{mean:.3f} +- {std:.3f}"  # no spread from one seed


def write_table(rows: list[dict], path: Path, base: TrainConfig, seeds: int, budget: float) -> None:
    tasks = list(dict.fromkeys(t for r in rows for t in r["dev_mean"]))
    by_metric: dict[str, list[str]] = {}
    for t in tasks:
        by_metric.setdefault(get_task(t).headline_name, []).append(t)
    measured = ", ".join(f"{metric} for {' and '.join(ts)}" for metric, ts in by_metric.items())
    head = ["configuration"] + [f"{t} {s}" for t in tasks for s in ("train", "dev")] + ["overall dev"]
    lines = [
        "# Ablation",
        "",
        f"{seeds} seed(s) per configuration, budget {budget}: {base.max_steps} steps of batch "
        f"{base.batch_size} per task, at most {base.train_limit} training examples per task, "
        f"model {base.model or 'all-MiniLM-L6-v2 (embedded default)'}. Scores are mean +- std over "
        f"seeds (a single seed shows no spread): {measured}; train scores on the training "
        "examples used (at most 1000 per task).",
        "",
        "The published numbers of the study are not available in this environment, so no "
        "column for them is shown; compare the ordering of rows, not absolute values.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["name"]]
        for t in tasks:
            for key in ("train", "dev"):
                mean, std = r[f"{key}_mean"].get(t), r[f"{key}_std"].get(t)
                cells.append(_cell(mean, std, r["seeds"]))
        cells.append(_cell(r["overall_mean"], r["overall_std"], r["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
