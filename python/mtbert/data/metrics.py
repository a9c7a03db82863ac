"""Metric arithmetic (scikit-learn / scipy do the work). Which metrics a task reports,
its headline number and its share of the overall score are in its registry entry
(`tasks.Task.metrics`, `Task.score`, `tasks.overall_scores`)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score


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


def regression_metrics(labels: np.ndarray, preds: np.ndarray,
                       label_range: tuple[float, float] = (0.0, 5.0)) -> dict:
    labels = np.asarray(labels, dtype=np.float64)
    preds = np.asarray(preds, dtype=np.float64)
    if len(labels) < 2 or np.all(preds == preds[0]) or np.all(labels == labels[0]):
        r = 0.0  # Pearson r is undefined for constant input; report no correlation
    else:
        r = float(pearsonr(labels, preds)[0])
    # Per-bucket accuracy: how often the rounded prediction equals the rounded gold score.
    lo, hi = int(math.floor(label_range[0] + 0.5)), int(math.floor(label_range[1] + 0.5))
    gold = np.rint(labels).astype(int)
    guess = np.clip(np.rint(preds), lo, hi).astype(int)
    buckets = {}
    for b in range(lo, hi + 1):
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


# The similarity metrics under their earlier name.
similarity_metrics = regression_metrics
