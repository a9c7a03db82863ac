"""Evaluation and prediction files for a trained MultitaskBert."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .batches import EncodedSplit, eval_batches
from .metrics import overall_scores, task_metrics
from .multitask import MultitaskBert

# Prediction file names and headers follow the course handout.
PREDICTION_COLUMN = {
    "sst": "Predicted_Sentiment",
    "para": "Predicted_Is_Paraphrase",
    "sts": "Predicted_Similarity",
    "cfimdb": "Predicted_Sentiment",
}


def split_label(split: str) -> str:
    """The handout names test-student predictions `-test-output.csv`."""
    return "test" if split == "test-student" else split


def autocast_context(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def predict_split(model: MultitaskBert, data: EncodedSplit, *, device: torch.device,
                  batch_size: int = 64, precision: str = "fp32") -> np.ndarray:
    """Predictions for every row of `data`, in the split's original order."""
    was_training = model.training
    model.eval()
    preds: Optional[np.ndarray] = None
    try:
        for idx, batch in eval_batches(data, batch_size):
            with autocast_context(device, precision):
                out = model.predict(data.task, batch.to(device)).float().cpu().numpy()
            if preds is None:
                preds = np.zeros(len(data), dtype=out.dtype)
            preds[idx] = out
    finally:
        model.train(was_training)
    return preds if preds is not None else np.zeros(0)


def evaluate_tasks(model: MultitaskBert, datasets: dict[str, EncodedSplit], *, device: torch.device,
                   batch_size: int = 64, precision: str = "fp32"
                   ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Metrics per labeled task plus the overall scores, and the predictions per task."""
    metrics: dict[str, dict] = {}
    predictions: dict[str, np.ndarray] = {}
    for task, data in datasets.items():
        preds = predict_split(model, data, device=device, batch_size=batch_size, precision=precision)
        predictions[task] = preds
        if data.labels is not None:
            metrics[task] = task_metrics(task, data.labels, preds)
    return metrics, predictions


def write_predictions(folder: Path, task: str, split: str, ids: list[str], preds: np.ndarray) -> Path:
    """`{task}-{split}-output.csv` with one row per input id."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}-{split_label(split)}-output.csv"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", PREDICTION_COLUMN[task]])
        for ex_id, p in zip(ids, preds):
            writer.writerow([ex_id, f"{float(p):.4f}" if task == "sts" else int(p)])
    tmp.replace(path)
    return path


def format_table(metrics: dict[str, dict]) -> str:
    """A small Markdown table of the headline metrics."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task, m in metrics.items():
        if task == "sts":
            rows.append(f"| sts | Pearson r | {m['pearson']:.4f} |")
        else:
            rows.append(f"| {task} | accuracy | {m['accuracy']:.4f} |")
            rows.append(f"| {task} | balanced accuracy | {m['balanced_accuracy']:.4f} |")
            rows.append(f"| {task} | F1 | {m['f1']:.4f} |")
    scores = overall_scores(metrics)
    if scores["overall"] is not None:
        rows.append(f"| all | overall (acc, acc, (r+1)/2) | {scores['overall']:.4f} |")
        rows.append(f"| all | plain mean | {scores['plain_mean']:.4f} |")
    return "\n".join(rows)
