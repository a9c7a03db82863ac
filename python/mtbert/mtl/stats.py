"""What one multi-task step reports: the Gram matrix, cosines, conflicts and the weights.

All of it is T x T or T: cheap to compute every step and to log (metrics.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .engine import gram

__all__ = ["ConflictStats", "AggregationStats", "gradient_conflicts"]


@dataclass(frozen=True)
class ConflictStats:
    """Gradient-conflict statistics of one set of task gradients, for logging."""

    gram: Tensor  # (T, T) float64 on the CPU: g_i · g_j
    cosine: Tensor  # (T, T) float64 on the CPU; 0 where a gradient is zero
    conflicts: int  # number of pairs i < j with g_i · g_j < 0
    conflict_pairs: list[tuple[int, int]]  # those pairs
    orders: Optional[Tensor] = None  # (T, T) int64: the orders used, when surgery ran

    @classmethod
    def from_gram(cls, gram: np.ndarray, orders: Optional[np.ndarray] = None) -> "ConflictStats":
        gram = np.array(gram, dtype=np.float64)  # own copy: callers may reuse their buffer
        T = gram.shape[0]
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))  # (T,)
        denom = np.outer(norms, norms)  # (T, T)
        cosine = np.zeros_like(gram)
        np.divide(gram, denom, out=cosine, where=denom > 0)
        np.clip(cosine, -1.0, 1.0, out=cosine)
        pairs = [(i, j) for i in range(T) for j in range(i + 1, T) if gram[i, j] < 0]
        return cls(
            gram=torch.from_numpy(gram),
            cosine=torch.from_numpy(cosine),
            conflicts=len(pairs),
            conflict_pairs=pairs,
            orders=None if orders is None else torch.from_numpy(np.array(orders, dtype=np.int64)),
        )


@dataclass(frozen=True)
class AggregationStats(ConflictStats):
    """Per-step telemetry (all T x T or T, cheap): the Gram matrix, cosines, conflicts,
    and the weights ``w`` the method chose (d = sum_i w_i g_i; loss weights for uw/dwa/rlw)."""

    weights: Optional[Tensor] = None
    method: str = ""

    has_gram: bool = True  # False for loss weighting: no per-task gradients, gram is zeros

    @classmethod
    def build(cls, method: str, weights: np.ndarray, gram: Optional[np.ndarray],
              orders: Optional[np.ndarray] = None) -> "AggregationStats":
        T = len(weights)
        base = ConflictStats.from_gram(np.zeros((T, T)) if gram is None else gram, orders)
        return cls(gram=base.gram, cosine=base.cosine, conflicts=base.conflicts,
                   conflict_pairs=base.conflict_pairs, orders=base.orders,
                   weights=torch.from_numpy(np.array(weights, dtype=np.float64)), method=method,
                   has_gram=gram is not None)

    def to_log(self) -> dict:
        """JSON-ready: weights and, for gradient methods, cosines and conflicts."""
        record = {"method": self.method, "weights": self.weights.tolist()}
        if self.has_gram:
            record.update(cosine=self.cosine.tolist(), conflicts=self.conflicts,
                          conflict_pairs=self.conflict_pairs)
        return record


def gradient_conflicts(grads: Union[Tensor, np.ndarray], *, num_threads: int = 0) -> ConflictStats:
    """Gram matrix, cosines and conflicting pairs of (T, P) ``grads`` (native on the CPU)."""
    return ConflictStats.from_gram(gram(grads, num_threads=num_threads))
