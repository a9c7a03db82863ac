"""MGDA and its exact min-norm solver (Nash-MTL uses the solver too)."""

from __future__ import annotations

import numpy as np
import scipy.optimize

from .base import Method


def min_norm_weights(G: np.ndarray) -> np.ndarray:
    """argmin over the simplex of w^T G w, exactly (an active-set NNLS).

    With G = A^T A, minimizing ||A u||^2 + (1 - sum u)^2 over u >= 0 gives u = s w* with
    w* the min-norm weights (for fixed s the best u/s is w*), so w* = u / sum(u).
    """
    T = G.shape[0]
    scale = np.max(np.diag(G), initial=0.0)
    if not scale > 0:
        return np.full(T, 1.0 / T)
    lam, V = np.linalg.eigh(G / scale)
    A = np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T  # (T, T), A^T A = G / scale
    u, _ = scipy.optimize.nnls(np.vstack([A, np.ones((1, T))]), np.r_[np.zeros(T), 1.0])
    return u / u.sum()


class MGDA(Method):
    """MGDA (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization"):
    the min-norm point of the convex hull of the task gradients, solved exactly."""

    name = "mgda"
    gradient_based = True

    def weights(self, G):
        return min_norm_weights(G)


def zero_in_hull(G: np.ndarray) -> bool:
    """Whether 0 is in the convex hull of the gradients (no common ascent direction): the
    min-norm point is zero to rounding. Nash-MTL and FairGrad have no solution then."""
    mn = min_norm_weights(G)
    return mn @ G @ mn <= 1e-16 * np.diag(G).max()
