"""Evaluation and prediction files for a trained MultitaskBert."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.batches import EncodedSplit, eval_batches
from ..files import write_file_atomically
from ..model.multitask import MultitaskBert
from ..data.tasks import get_task, overall_scores

def split_label(split: str) -> str:
    """The handout names test-student predictions `-test-output.csv`."""
    return "test" if split == "test-student" else split


def autocast_context(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def _every_row(model: MultitaskBert, data: EncodedSplit, compute, *, device: torch.device,
               batch_size: int, precision: str) -> Optional[torch.Tensor]:
    """`compute(batch)` for every row of `data`, in eval mode, in the split's original order."""
    was_training = model.training
    model.eval()
    rows: Optional[torch.Tensor] = None
    try:
        for idx, batch in eval_batches(data, batch_size):
            with autocast_context(device, precision):
                out = compute(batch.to(device))
            if rows is None:
                rows = out.new_empty((len(data), *out.shape[1:]))
            rows[torch.from_numpy(idx).to(out.device)] = out
    finally:
        model.train(was_training)
    return rows


def predict_split(model: MultitaskBert, data: EncodedSplit, *, device: torch.device,
                  batch_size: int = 64, precision: str = "fp32") -> np.ndarray:
    """Predictions for every row of `data`, in the split's original order."""
    preds = _every_row(model, data, lambda batch: model.predict(data.task, batch).float(),
                       device=device, batch_size=batch_size, precision=precision)
    return preds.cpu().numpy() if preds is not None else np.zeros(0, dtype=np.float32)


def cache_features(model: MultitaskBert, data: EncodedSplit, *, device: torch.device,
                   batch_size: int = 64, precision: str = "fp32") -> None:
    """Store in `data.features` what the (frozen) encoder gives every row: a frozen run then
    trains and evaluates its heads without running the encoder again each epoch."""
    data.features = _every_row(model, data, lambda batch: model.features(data.task, batch),
                               device=device, batch_size=batch_size, precision=precision)


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
            metrics[task] = get_task(task).metrics(data.labels, preds)
    return metrics, predictions


def write_predictions(folder: Path, task: str, split: str, ids: list[str], preds: np.ndarray) -> Path:
    """`{task}-{split}-output.csv` with one row per input id (file names and the built-in
    tasks' headers follow the course handout)."""
    spec = get_task(task)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", spec.prediction_column])
            for ex_id, p in zip(ids, preds):
                writer.writerow([ex_id, spec.format_prediction(p)])
    return write_file_atomically(folder / f"{task}-{split_label(split)}-output.csv", write)


def format_table(metrics: dict[str, dict]) -> str:
    """A small Markdown table of the headline metrics."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task, m in metrics.items():
        for name, value in get_task(task).table_rows(m):
            rows.append(f"| {task} | {name} | {value:.4f} |")
    scores = overall_scores(metrics)
    if scores["overall"] is not None:
        rows.append(f"| all | overall (acc, acc, (r+1)/2) | {scores['overall']:.4f} |")
        rows.append(f"| all | plain mean | {scores['plain_mean']:.4f} |")
    return "\n".join(rows)
