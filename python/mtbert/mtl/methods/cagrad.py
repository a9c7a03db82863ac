"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import numpy as np
import scipy.optimize

from ...limits import Limit
from .base import Method, Param

# A conflict-averse g_w shorter than this fraction of the longest gradient is 0
# (the subproblem's solver is accurate to about 1e-8: a shorter g_w has no direction).
_NO_DIRECTION = 1e-6


def _polish(x: np.ndarray, A: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Newton steps on CAGrad's optimality conditions on the support S of ``x`` (SLSQP's
    answer): b_S + r (A x)_S / sqrt(x^T A x) = lambda 1, sum x_S = 1. SLSQP stops near
    1e-8 on this non-smooth objective; the polished x is kept only if it stays feasible
    and does not increase the objective."""
    F = lambda v: v @ b + r * np.sqrt(max(v @ A @ v, 0.0))
    S = np.flatnonzero(x > 1e-12)
    best = x
    y = x.copy()
    for _ in range(20):
        xs = y[S]
        Ax = A[np.ix_(S, S)] @ xs
        n = np.sqrt(max(xs @ Ax, 0.0))
        if not n > 0:
            break
        k = len(S)
        res = np.r_[b[S] + r * Ax / n - 0.0, 1.0 - xs.sum()]
        J = np.zeros((k + 1, k + 1))
        J[:k, :k] = r * (A[np.ix_(S, S)] / n - np.outer(Ax, Ax) / n**3)
        J[:k, k] = -1.0  # d/d lambda
        J[k, :k] = -1.0
        lam = np.mean(b[S] + r * Ax / n)
        res[:k] -= lam
        step = np.linalg.lstsq(J, -np.r_[res[:k], res[k]], rcond=None)[0]
        z = y.copy()
        z[S] = xs + step[:k]
        if np.any(z[S] < 0):
            break
        z /= z.sum()
        if F(z) <= F(best) + 1e-16 * abs(F(best)):
            best = z
        y = z
        if np.linalg.norm(step[:k]) < 1e-15:
            break
    return best


class CAGrad(Method):
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"):
    w = argmin_{simplex} g_w . g0 + c ||g0|| ||g_w||, d = g0 + c ||g0|| g_w / ||g_w||, with
    g0 the mean gradient; divided by 1 + c^2 (rescale=1, the official default), 1 + c (2),
    or not (0). Where the optimal g_w is 0 (0 in the convex hull: Pareto-stationary) it has
    no direction and d = g0 (the official code divides by ||g_w|| + 1e-8 there)."""

    name = "cagrad"
    gradient_based = True
    # SLSQP on the simplex: ~0.1 s at T = 64 and ~20 s at T = 128 (one thread; docs/methods.md)
    max_tasks = 64

    # c: the paper uses 0.1-0.9; far beyond, the subproblem's scale leaves float64's range
    params = {"c": Param(0.4, Limit(float, 0.0, 100.0)), "rescale": Param(1, Limit(int, 0, 2))}

    def weights(self, G):
        T, c = G.shape[0], float(self.options["c"])
        mean = np.full(T, 1.0 / T)
        radius = c * np.sqrt(max(mean @ G @ mean, 0.0))  # c ||g0||
        w = mean.copy()
        if radius > 0:
            s = np.max(np.diag(G))  # the objective scaled to O(1): same argmin
            b, A = G @ mean / s, G / s
            r = radius / np.sqrt(s)
            res = scipy.optimize.minimize(
                lambda x: x @ b + r * np.sqrt(max(x @ A @ x, 0.0)), mean,
                bounds=[(0.0, 1.0)] * T, constraints={"type": "eq", "fun": lambda x: 1.0 - x.sum()},
                method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
            x = _polish(np.clip(res.x, 0.0, None) / np.clip(res.x, 0.0, None).sum(), A, b, r)
            gw_norm = np.sqrt(max(x @ G @ x, 0.0))
            if gw_norm > _NO_DIRECTION * np.sqrt(s):  # else 0 is in the hull: no direction, d = g0
                w = mean + radius / gw_norm * x
        return w / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[self.options["rescale"]]
