"""The results of finished mtbert run folders, and a compact copy of many runs in one folder.

A finished run folder (`mtbert-train --out`) holds summary.json (headline dev and train
metrics, best step), `<task>-dev-output.csv` (dev predictions), metrics.jsonl (the training
log; PCGrad's pairwise gradient cosines when it ran) and, where a launcher wrote one,
wall_time.json. `read_run` turns such a folder into a record, its dev predictions aligned to
the gold id order, and PCGrad's telemetry averaged over bins of steps.

The compact copy keeps what comparisons need from many runs, small enough to commit:
runs.json ({"meta": ..., "runs": [record, ...]}), dev_predictions.npz ("<run id>|<task>" ->
predictions in gold id order) and conflicts.json (run id -> telemetry). Its meta holds a digest
of the dev ids the predictions were aligned to, so a copy is never scored against other labels.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from mtbert.data import load_split

TASKS = ("sst", "para", "sts")
TASK_METRIC = {"sst": "accuracy", "para": "accuracy", "sts": "pearson"}  # the headline metric
TASK_LABEL = {"sst": "SST acc", "para": "Quora acc", "sts": "STS r"}
PRED_COLUMN = {"sst": "Predicted_Sentiment", "para": "Predicted_Is_Paraphrase", "sts": "Predicted_Similarity"}
# PCGrad logs the full cosine matrix of the task gradients, tasks in the order sst, para, sts.
PAIRS = ((0, 1), (0, 2), (1, 2))
PAIR_NAMES = ("sst-para", "sst-sts", "para-sts")

COPY_FILES = ("runs.json", "dev_predictions.npz", "conflicts.json")


# ---------------------------------------------------------------- dev gold labels

def gold_labels(data_dir: Optional[str], tasks=TASKS) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Dev ids (file order) and gold labels per task, from the handout data in `data_dir`
    (None: resolved as mtbert does)."""
    ids, gold = {}, {}
    for task in tasks:
        split = load_split(task, "dev", data_dir, warn=False)
        ids[task] = [e.id for e in split.examples]
        gold[task] = np.array([e.label for e in split.examples], dtype=np.float64)
    return ids, gold


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def check_ids(meta: dict, ids: dict[str, list[str]]) -> None:
    """Raise ValueError unless the dev ids are those a copy's predictions were aligned to."""
    for task, digest in meta["dev_ids_sha256"].items():
        if ids_digest(ids[task]) != digest:
            raise ValueError(f"the {task} dev ids of the data dir differ from those the predictions were "
                             "aligned to; use the same handout data")


# ---------------------------------------------------------------- one run folder

def headline(metrics: dict) -> dict[str, float]:
    """The headline metric of each task in a summary's metrics (accuracy; Pearson r for STS)."""
    return {t: float(m[TASK_METRIC[t]]) for t, m in metrics.items() if t in TASKS}


def read_predictions(path: Path, task: str, ids: list[str]) -> np.ndarray:
    """A run's dev predictions in gold id order: -1 (classes) or NaN (scores) where absent."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = {r["id"].strip(): r[PRED_COLUMN[task]] for r in csv.DictReader(f)}
    if TASK_METRIC[task] == "pearson":
        return np.array([float(rows[i]) if i in rows else np.nan for i in ids], dtype=np.float32)
    return np.array([int(float(rows[i])) if i in rows else -1 for i in ids], dtype=np.int8)


def telemetry(folder: Path, bin_steps: int) -> Optional[dict]:
    """PCGrad's per-step gradient cosines (metrics.jsonl) averaged per `bin_steps` steps, per
    task pair: the fraction of steps in conflict (cos < 0), the mean cosine and mean |cosine|,
    and conflicting pairs per step. None for a run without PCGrad."""
    per_step = {}
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        # PCGrad's per-step records: type "aggregation" with method "pcgrad" (before every
        # method went through one backward: type "pcgrad", or a train line's "pcgrad" entry)
        if rec.get("type") == "pcgrad" or (rec.get("type") == "aggregation" and rec.get("method") == "pcgrad"):
            per_step[rec["step"]] = rec["cosine"]
        elif rec.get("type") == "train" and isinstance(rec.get("pcgrad"), dict):
            per_step[rec["step"]] = rec["pcgrad"]["cosine"]
        elif (rec.get("type") == "train" and isinstance(rec.get("aggregation"), dict)
              and rec["aggregation"].get("method") == "pcgrad"):
            per_step[rec["step"]] = rec["aggregation"]["cosine"]
    if not per_step:
        return None
    steps = np.array(sorted(per_step))
    cos = np.array([[per_step[s][i][j] for i, j in PAIRS] for s in steps])  # (steps, pairs)
    bins = (steps - 1) // bin_steps
    out = {"bin_steps": bin_steps, "bin_end_step": [], "conflict_fraction": {p: [] for p in PAIR_NAMES},
           "mean_cosine": {p: [] for p in PAIR_NAMES}, "mean_abs_cosine": {p: [] for p in PAIR_NAMES},
           "mean_conflicts_per_step": []}
    for b in np.unique(bins):
        rows = cos[bins == b]
        out["bin_end_step"].append(int(steps[bins == b].max()))
        out["mean_conflicts_per_step"].append(round(float((rows < 0).sum(axis=1).mean()), 4))
        for k, p in enumerate(PAIR_NAMES):
            out["conflict_fraction"][p].append(round(float((rows[:, k] < 0).mean()), 4))
            out["mean_cosine"][p].append(round(float(rows[:, k].mean()), 5))
            out["mean_abs_cosine"][p].append(round(float(np.abs(rows[:, k]).mean()), 5))
    return out


def read_run(folder: Path, ids: dict[str, list[str]], bin_steps: int
             ) -> tuple[dict, dict[str, np.ndarray], Optional[dict]]:
    """One finished run folder: its record (best step, wall time, headline dev and train
    metrics, overall score), its dev predictions per task in the order of `ids`, and its
    PCGrad telemetry (None without PCGrad)."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    wall = folder / "wall_time.json"
    record = {"best_step": summary.get("best_step"),
              "wall_seconds": json.loads(wall.read_text())["seconds"] if wall.is_file() else None,
              "dev": headline(summary["dev"]), "train": headline(summary.get("train", {})),
              "overall": summary.get("overall")}
    preds = {}
    for task in record["dev"]:
        pred_file = folder / f"{task}-dev-output.csv"
        if pred_file.is_file():
            preds[task] = read_predictions(pred_file, task, ids[task])
    tel = telemetry(folder, bin_steps) if (folder / "metrics.jsonl").is_file() else None
    return record, preds, tel


# ---------------------------------------------------------------- the compact copy

def read_copy(folder: Path, ids: dict[str, list[str]]) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """The records, predictions and telemetry of the copy in `folder` (empty when there is
    none); its dev ids must be `ids`."""
    if not (folder / "runs.json").is_file():
        return [], {}, {}
    raw = json.loads((folder / "runs.json").read_text(encoding="utf-8"))
    check_ids(raw["meta"], ids)
    with np.load(folder / "dev_predictions.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return raw["runs"], arrays, json.loads((folder / "conflicts.json").read_text(encoding="utf-8"))


def write_copy(folder: Path, ids: dict[str, list[str]], records: list[dict], arrays: dict[str, np.ndarray],
               conflicts: dict) -> None:
    """Write the copy (runs.json, dev_predictions.npz, conflicts.json) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"dev_ids_sha256": {t: ids_digest(ids[t]) for t in TASKS},
            "dev_counts": {t: len(ids[t]) for t in TASKS}}
    (folder / "runs.json").write_text(json.dumps({"meta": meta, "runs": records}, indent=1) + "\n")
    np.savez_compressed(folder / "dev_predictions.npz", **arrays)
    (folder / "conflicts.json").write_text(json.dumps(conflicts, separators=(",", ":")) + "\n")
