"""Task metrics (scikit-learn / scipy do the arithmetic) and the overall score."""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

from .data import TASKS

# The number each task contributes to the overall score, scaled to [0, 1].
PRIMARY_METRIC = {"sst": "accuracy", "para": "accuracy", "sts": "pearson", "cfimdb": "accuracy"}


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    classes = list(range(num_classes))
    with warnings.catch_warnings():
        # A class absent from a small slice's gold labels is fine: its recall is reported as 0.
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(labels, preds))
    per_class = recall_score(labels, preds, labels=classes, average=None, zero_division=0)
    average = "binary" if num_classes == 2 else "macro"
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": balanced,
        "f1": float(f1_score(labels, preds, labels=classes, average=average, zero_division=0)),
        # Accuracy on the examples of each true class (the published per-label figures).
        "per_class_accuracy": {str(c): float(a) for c, a in zip(classes, per_class)},
        "count": int(len(labels)),
    }


def similarity_metrics(labels: np.ndarray, preds: np.ndarray) -> dict:
    labels = np.asarray(labels, dtype=np.float64)
    preds = np.asarray(preds, dtype=np.float64)
    if len(labels) < 2 or np.all(preds == preds[0]) or np.all(labels == labels[0]):
        r = 0.0  # Pearson r is undefined for constant input; report no correlation
    else:
        r = float(pearsonr(labels, preds)[0])
    # Per-bucket accuracy: how often the rounded prediction equals the rounded gold score.
    gold = np.rint(labels).astype(int)
    guess = np.clip(np.rint(preds), 0, 5).astype(int)
    buckets = {}
    for b in range(6):
        sel = gold == b
        if sel.any():
            buckets[str(b)] = float((guess[sel] == b).mean())
    return {
        "pearson": r,
        "mse": float(np.mean((labels - preds) ** 2)) if len(labels) else 0.0,
        "rounded_accuracy": float((guess == gold).mean()) if len(labels) else 0.0,
        "per_bucket_accuracy": buckets,
        "count": int(len(labels)),
    }


def task_metrics(task: str, labels: np.ndarray, preds: np.ndarray) -> dict:
    spec = TASKS[task]
    if spec.kind == "regression":
        return similarity_metrics(labels, preds)
    return classification_metrics(np.asarray(labels).astype(int), np.asarray(preds).astype(int),
                                  spec.num_classes)


def primary_score(task: str, metrics: dict) -> float:
    """A task's headline number in [0, 1]: accuracy, or (r + 1) / 2 for similarity."""
    if task == "sts":
        return (metrics["pearson"] + 1.0) / 2.0
    return metrics[PRIMARY_METRIC[task]]


def overall_scores(per_task: dict[str, dict]) -> dict[str, Optional[float]]:
    """overall: mean of accuracies and (r+1)/2 (the course's score); plain_mean: mean of
    accuracies and r as they are."""
    if not per_task:
        return {"overall": None, "plain_mean": None}
    overall = float(np.mean([primary_score(t, m) for t, m in per_task.items()]))
    plain = float(np.mean([m[PRIMARY_METRIC[t]] for t, m in per_task.items()]))
    return {"overall": overall, "plain_mean": plain}
