"""PNG plots of a run (learning curves, per-class accuracy, gradient conflicts) and of an ablation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data.tasks import get_task  # noqa: E402


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_learning_curves(records: list[dict], path: Path) -> Optional[Path]:
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train:
        return None
    tasks = sorted({t for r in train for t in r["loss"]})
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), squeeze=False)
    for col, task in enumerate(tasks):
        pts = [(r["step"], r["loss"][task]) for r in train if task in r["loss"]]
        axes[0][col].plot(*zip(*pts))
        axes[0][col].set_title(f"{task} training loss")
        axes[0][col].set_xlabel("step")
        spec = get_task(task)
        key, label = spec.headline_metric, spec.headline_title
        dev = [(r["step"], r["metrics"][task][key]) for r in evals if task in r["metrics"]]
        if dev:
            axes[1][col].plot(*zip(*dev), marker="o")
        axes[1][col].set_title(f"dev {label}")
        axes[1][col].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_class(metrics: dict[str, dict], path: Path) -> Optional[Path]:
    panels = [(t, m.get("per_class_accuracy") or m.get("per_bucket_accuracy")) for t, m in metrics.items()]
    panels = [(t, d) for t, d in panels if d]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (task, per) in zip(axes[0], panels):
        labels = list(per)
        ax.bar(labels, [per[k] for k in labels], color="tab:blue")
        ax.set_ylim(0, 1)
        unit, axis = get_task(task).per_class_axis
        ax.set_title(f"{task}: accuracy per {unit}")
        ax.set_xlabel(axis)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def step_cosines(record: dict) -> Optional[list]:
    """The (T, T) gradient cosines a metrics.jsonl record holds, else None: the per-step
    "aggregation" records of the gradient methods (and, in runs made before every method
    went through one backward, PCGrad's "pcgrad" records), or a train line carrying them."""
    kind = record.get("type")
    if kind in ("aggregation", "pcgrad"):
        return record.get("cosine")
    if kind == "train":
        for key in ("aggregation", "pcgrad"):
            if isinstance(record.get(key), dict) and "cosine" in record[key]:
                return record[key]["cosine"]
    return None


def plot_conflicts(records: list[dict], path: Path, tasks: Optional[list[str]] = None) -> Optional[Path]:
    pts = [(r["step"], cosine) for r in records if (cosine := step_cosines(r)) is not None]
    if not pts:
        return None
    pts.sort(key=lambda p: p[0])
    t = len(pts[0][1])
    names = tasks if tasks and len(tasks) == t else [str(i) for i in range(t)]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [p[0] for p in pts]
    for i in range(t):
        for j in range(i + 1, t):
            ax.plot(steps, [p[1][i][j] for p in pts], label=f"{names[i]} / {names[j]}", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine of task gradients")
    ax.set_title("gradient conflicts (below 0: PCGrad projects)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_method_weights(records: list[dict], path: Path, tasks: Optional[list[str]] = None) -> Optional[Path]:
    """The weights w each step's multi-task method chose (d = sum_i w_i g_i, or the loss
    weights of uw/dwa/rlw), from the per-step "aggregation" records (issue 13)."""
    pts = [(r["step"], (r["aggregation"] if r.get("type") == "train" else r)) for r in records
           if r.get("type") == "aggregation" or (r.get("type") == "train" and "aggregation" in r)]
    if not pts:
        return None
    by_step = {step: rec for step, rec in pts}  # train and per-step records repeat no step
    steps = sorted(by_step)
    t = len(by_step[steps[0]]["weights"])
    names = tasks if tasks and len(tasks) == t else [str(i) for i in range(t)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in range(t):
        ax.plot(steps, [by_step[s]["weights"][i] for s in steps], label=names[i], lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("weight w_i")
    ax.set_title(f"task weights chosen by {by_step[steps[0]].get('method', 'the method')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, dev_metrics: Optional[dict] = None) -> list[Path]:
    """Every plot the run's files allow; returns the PNGs written."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    tasks = None
    summary = run_dir / "summary.json"
    if dev_metrics is None and summary.is_file():
        dev_metrics = json.loads(summary.read_text(encoding="utf-8")).get("dev")
    if dev_metrics:
        tasks = list(dev_metrics)
    written = [
        plot_learning_curves(records, run_dir / "learning_curves.png"),
        plot_per_class(dev_metrics or {}, run_dir / "per_class_accuracy.png"),
        plot_conflicts(records, run_dir / "gradient_conflicts.png", tasks),
        plot_method_weights(records, run_dir / "method_weights.png", tasks),
    ]
    return [p for p in written if p is not None]


def plot_ablation(rows: list[dict], path: Path) -> Path:
    """Grouped bars: one group per task metric, one bar per configuration, std error bars."""
    metrics = list(dict.fromkeys(t for r in rows for t in r["dev_mean"]))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 5))
    x = np.arange(len(metrics))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        means = [r["dev_mean"].get(m, np.nan) for m in metrics]
        stds = [r["dev_std"].get(m, 0.0) for m in metrics]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=r["name"], color=cmap(i % 20))
    ax.set_xticks(x, [get_task(m).headline_title for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_ylabel("dev score (mean over seeds)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pareto_front(points: np.ndarray) -> np.ndarray:
    """(N,) bool: the rows of (N, T) scores (higher is better) that no other row dominates
    (at least as good on every task, better on one)."""
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        others = np.delete(points, i, axis=0)
        keep[i] = not np.any(np.all(others >= p, axis=1) & np.any(others > p, axis=1))
    return keep


def plot_front(weight_rows: list[dict], method_rows: Optional[list[dict]], path: Path) -> Path:
    """The weighted sum's trade-off front (mtbert-ablate --grid weights): one panel per pair of
    tasks, dev scores (mean over seeds) of every fixed-weight point, the points no other
    dominates on all tasks in black, the equal weights (the plain sum) ringed, and each
    method's point (--grid methods in the same folder) labelled."""
    tasks = list(dict.fromkeys(t for r in weight_rows for t in r["dev_mean"]))
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]] or [(tasks[0], tasks[0])]
    scores = np.array([[r["dev_mean"].get(t, np.nan) for t in tasks] for r in weight_rows])
    front = pareto_front(np.nan_to_num(scores, nan=-np.inf))
    equal = [i for i, r in enumerate(weight_rows) if r.get("task_weights") == {}]  # no weights: the plain sum
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (a, b) in zip(axes[0], pairs):
        ia, ib = tasks.index(a), tasks.index(b)
        ax.scatter(scores[~front, ia], scores[~front, ib], color="0.6", s=20, label="fixed weights")
        ax.scatter(scores[front, ia], scores[front, ib], color="black", s=24, label="fixed weights, on the front")
        for i in equal:
            ax.scatter(scores[i, ia], scores[i, ib], facecolors="none", edgecolors="red", s=90,
                       label="equal weights (sum)")
        for k, r in enumerate(method_rows or []):
            x, y = r["dev_mean"].get(a, np.nan), r["dev_mean"].get(b, np.nan)
            ax.scatter([x], [y], marker="D", s=30, color=cmap(k % 20), label=r["name"])
            ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"dev {get_task(a).headline_title}")
        ax.set_ylabel(f"dev {get_task(b).headline_title}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right")
    fig.suptitle("weighted sums (mean over seeds) and the methods")
    fig.tight_layout(rect=(0, 0, 0.85, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

