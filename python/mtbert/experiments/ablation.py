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
from ..evaluation.plots import plot_ablation, plot_front
from ..files import write_json
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

# Fixed task weights for --combine sum (Xin et al. 2022: a tuned weighted sum is the baseline a
# method must beat). The points of a simplex lattice: every way to split WEIGHT_RESOLUTION
# units among the T tasks with at least one unit each, scaled so the weights sum to T (as the
# plain sum's do). For T = 3 and resolution 6 that is C(5, 2) = 10 points: the plain sum
# (2, 2, 2) itself, and weight ratios up to 4 between two tasks; every weight is >= 0.5, so
# every head trains. A zero weight would leave a head untrained and its score at chance: the
# front's ends would be single-task runs, which mtbert-train --tasks already gives.
WEIGHT_RESOLUTION = 6


def compositions(units: int, parts: int) -> list[tuple[int, ...]]:
    """Every tuple of `parts` positive integers summing to `units`, in lexicographic order."""
    if parts == 1:
        return [(units,)] if units >= 1 else []
    return [(first, *rest) for first in range(1, units - parts + 2) for rest in compositions(units - first, parts - 1)]


def weight_grid(tasks: list[str], resolution: int = WEIGHT_RESOLUTION) -> list[tuple[str, dict]]:
    """The fixed task weights of --grid weights for `tasks` (see WEIGHT_RESOLUTION); the
    equal point is the plain sum (no --task-weights), added when the lattice lacks it."""
    T = len(tasks)
    configs = []
    for units in compositions(resolution, T):
        weights = {t: T * u / resolution for t, u in zip(tasks, units)}
        equal = all(u * T == resolution for u in units)
        configs.append((weights_name(weights), {"task_weights": {} if equal else weights}))
    if not any(not o["task_weights"] for _, o in configs):
        configs.insert(0, (weights_name({t: 1.0 for t in tasks}), {"task_weights": {}}))
    return configs


def weights_name(weights: dict[str, float]) -> str:
    return "weights " + ",".join(f"{t}={w:.3g}" for t, w in weights.items())


def sampling_grid(tasks: list[str]) -> list[tuple[str, dict]]:
    """All tasks per step against one task per step (sentence-transformers' multi-dataset
    trainer) at equal examples seen: a one-task run takes T times the steps (steps_scale)."""
    T = len(tasks)
    return [("all tasks per step", {"sampling": "round-robin"}),
            ("one task per step, in turn", {"sampling": "one-round-robin", "steps_scale": T}),
            ("one task per step, by size", {"sampling": "one-proportional", "steps_scale": T})]


# A grid is a list of (name, overrides), or a function of the base configuration's tasks giving one.
GRIDS = {"seed": SEED_GRID, "methods": METHODS_GRID, "weights": weight_grid, "sampling": sampling_grid}


def grid_configs(grid: str, tasks: list[str]) -> list[tuple[str, dict]]:
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; grids: {', '.join(GRIDS)}")
    configs = GRIDS[grid]
    return configs(list(tasks)) if callable(configs) else list(configs)

# Budget 1.0: each run takes this many steps on at most this many examples per task.
BASE_STEPS = 300
BASE_TRAIN_LIMIT = 4000


def slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in name)
    return "-".join(filter(None, keep.split("-")))


def run_config(base: TrainConfig, overrides: dict, seed: int, out: Path, lr: Optional[float] = None) -> TrainConfig:
    """One run's configuration: `base` with the grid's overrides; ``lr`` (an --lrs value)
    replaces base.lr before the configuration's lr_scale; steps_scale multiplies the steps
    (and the steps of an epoch) to keep the examples seen equal with fewer tasks per step."""
    overrides = dict(overrides)
    lr = (base.lr if lr is None else lr) * overrides.pop("lr_scale", 1.0)
    batch = base.batch_size * overrides.pop("batch_scale", 1)
    scale = overrides.pop("steps_scale", 1)
    if scale != 1:
        overrides["max_steps"] = base.max_steps * scale if base.max_steps else None
        overrides["steps_per_epoch"] = (base.steps_per_epoch or 0) * scale
    return replace(base, **overrides, lr=lr, batch_size=batch, seed=seed, out=str(out))


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.array(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def headline(metrics: dict) -> dict[str, float]:
    return {t: m[get_task(t).headline_metric] for t, m in metrics.items()}


def run_grid(base: TrainConfig, *, grid: str = "seed", seeds: int = 3, budget: float = 1.0,
             out: Path, only: Optional[list[str]] = None, lrs: Optional[list[float]] = None) -> list[dict]:
    """Run every configuration of `grid` for `seeds` seeds; write ablation.md, ablation.png
    ablation-GRID.json (the rows), front.png when the weights grid's rows are there,
    and the paired comparison of every configuration with the sum of losses (compare.md,
    compare.json, compare.png; see compare.py).

    With `lrs`, every configuration runs at each lr; the lr whose best checkpoints have the
    highest held-out score (base.holdout training rows per task, never trained on; mean over
    seeds) is selected, and the row reports that lr's dev scores. The dev split selects
    nothing: with --holdout the best checkpoint of each run is selected on the held-out rows too.
    """
    configs = grid_configs(grid, base.tasks)
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    if budget <= 0:
        raise ValueError("budget must be > 0")
    if lrs is not None:
        lrs = list(dict.fromkeys(float(lr) for lr in lrs))
        if not lrs:
            raise ValueError("--lrs needs at least one learning rate")
        if not base.holdout:
            raise ValueError("--lrs selects each configuration's lr on held-out training rows: give --holdout N "
                             "(N rows of each task's training file)")
    configs = [(n, o) for n, o in configs if only is None or slug(n) in only or n in only]
    if base.max_steps is None:
        base = replace(base, max_steps=max(1, int(round(BASE_STEPS * budget))))
    if base.train_limit is None:
        base = replace(base, train_limit=max(base.batch_size, int(round(BASE_TRAIN_LIMIT * budget))))
    base = replace(base, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    sweep = lrs if lrs is not None else [None]
    jobs = [(name, o, lr, base.seed + s) for name, o in configs for lr in sweep for s in range(seeds)]
    results: dict[tuple[str, Optional[float]], list[dict]] = {(name, lr): [] for name, _ in configs for lr in sweep}
    folders = {}  # run folder -> the configuration's name in the comparison
    with tqdm(total=len(jobs), desc="ablation", unit="run") as bar:
        for name, overrides, lr, seed in jobs:
            run_dir = out / "runs" / (f"{slug(name)}-seed{seed}" if lr is None else f"{slug(name)}-lr{lr:g}-seed{seed}")
            folders[run_dir] = name if lr is None else f"{name} (lr {lr:g})"
            summary_path = run_dir / "summary.json"
            if not summary_path.is_file():  # finished runs are kept, not rerun
                bar.set_postfix_str(f"{name} seed {seed}" + ("" if lr is None else f" lr {lr:g}"))
                train(run_config(base, overrides, seed, run_dir, lr))
            results[(name, lr)].append(json.loads(summary_path.read_text(encoding="utf-8")))
            bar.update(1)

    rows = []
    for name, overrides in configs:
        held = {lr: _stats([r["holdout_overall"] for r in results[(name, lr)]])[0] for lr in sweep
                if lr is not None}
        chosen = max(held, key=held.get) if held else None  # ties: the first lr given
        row = summarize(name, results[(name, chosen)])
        if "task_weights" in overrides:  # the weights grid ({}: the plain sum)
            row["task_weights"] = overrides["task_weights"]
        if lrs is not None:
            row["lr"], row["holdout_by_lr"] = chosen, {f"{lr:g}": v for lr, v in held.items()}
        rows.append(row)
    write_table(rows, out / "ablation.md", base, seeds, budget)
    plot_ablation(rows, out / "ablation.png")
    settings = {"seeds": seeds, "budget": budget, "max_steps": base.max_steps, "train_limit": base.train_limit,
                "batch_size": base.batch_size, "lr": base.lr, "lrs": lrs, "holdout": base.holdout,
                "tasks": list(base.tasks)}
    write_json(out / f"ablation-{grid}.json", {"grid": grid, "settings": settings, "rows": rows})
    draw_front(out)
    report = compare_runs(list(folders), data_dir=base.data_dir, names=folders)
    write_report(report, out, title=f"Ablation grid {grid!r}: each configuration against {report['baseline']}")
    return rows


def summarize(name: str, runs: list[dict]) -> dict:
    """A configuration's row: mean and std over its runs (seeds) of each task's dev and
    train scores and of the overall dev score."""
    dev = [headline(r["dev"]) for r in runs]
    trn = [headline(r.get("train", {})) for r in runs]
    row = {"name": name, "seeds": len(runs), "dev_mean": {}, "dev_std": {}, "train_mean": {}, "train_std": {}}
    for key, table in (("dev", dev), ("train", trn)):
        for task in dev[0]:
            vals = [d[task] for d in table if task in d]
            if vals:
                row[f"{key}_mean"][task], row[f"{key}_std"][task] = _stats(vals)
    row["overall_mean"], row["overall_std"] = _stats([r["overall"] for r in runs])
    return row


def draw_front(out: Path) -> Optional[Path]:
    """front.png from ablation-weights.json in `out`: the weighted sums' per-task dev scores,
    with each method's point from ablation-methods.json when that grid ran in the same folder
    with the same settings (seeds, budget, steps, lrs, ...). None without the weights grid."""
    weights_file, methods_file = out / "ablation-weights.json", out / "ablation-methods.json"
    if not weights_file.is_file():
        return None
    weights = json.loads(weights_file.read_text(encoding="utf-8"))
    methods = None
    if methods_file.is_file():
        found = json.loads(methods_file.read_text(encoding="utf-8"))
        if found["settings"] == weights["settings"]:
            methods = found["rows"]
    return plot_front(weights["rows"], methods, out / "front.png")
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
    ]
    if base.holdout:
        lines += [f"Each run's best checkpoint was selected on {base.holdout} held-out rows of each task's "
                  "training file (never trained on), not on dev."
                  + (" The lr of each configuration is the one of the lrs swept whose best checkpoints "
                     "scored highest on those rows (mean over seeds); the scores shown are that lr's dev scores."
                     if any("lr" in r for r in rows) else ""), ""]
    if any("lr" in r for r in rows):
        head += ["selected lr", "held-out overall by lr"]
    lines += [
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
        if "lr" in r:
            cells += [f"{r['lr']:g}", ", ".join(f"{lr}: {v:.3f}" for lr, v in r["holdout_by_lr"].items())]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
