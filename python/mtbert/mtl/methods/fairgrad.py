"""FairGrad: alpha-fair resource allocation among the tasks."""

from __future__ import annotations

import numpy as np

from ...limits import Limit
from .base import Method, Param, live_block
from .mgda import zero_in_hull


def alpha_fair_weights(G: np.ndarray, alpha: float) -> np.ndarray:
    """The w > 0 with (G w)_i = w_i^(-1/alpha), for a positive definite enough G (no zero
    gradient, 0 outside the convex hull of the gradients); zeros when there is none.

    It is the minimizer of the strictly convex f(w) = w^T G w / 2 - sum_i h(w_i) with
    h'(w) = w^(-1/alpha) (h = log for alpha = 1, else w^p / p with p = 1 - 1/alpha), found
    by Newton steps with an exact line search that stay in w > 0. G is solved at unit
    (Frobenius) scale: w(G / s) = s^(alpha / (1 + alpha)) w(G). Zeros also where the
    solution is beyond float64's reach (nearly Pareto-stationary gradients with a large
    alpha: w grows like (G w)^(-alpha))."""
    T = G.shape[0]
    m = np.abs(G).max()
    s = m * np.linalg.norm(G / m)  # Frobenius norm, safe from underflow
    Gn = G / s
    k = 1.0 / alpha

    def gradient(x):  # of f: the equations G x - x^(-1/alpha)
        with np.errstate(over="ignore", divide="ignore"):
            return Gn @ x - x ** (-k)

    def residual(x):  # the equations' error relative to their terms' size (rounding: ~1e-16)
        with np.errstate(over="ignore", divide="ignore"):
            return (np.abs(gradient(x)) / (np.abs(Gn) @ x + x ** (-k))).max()

    w = np.diag(Gn) ** (-alpha / (1.0 + alpha))  # the answer when the gradients are orthogonal
    for _ in range(200):
        if residual(w) < 1e-13:
            break
        r = gradient(w)
        with np.errstate(over="ignore"):
            H = Gn + np.diag(k * w ** (-k - 1.0))
        if not (np.isfinite(r).all() and np.isfinite(H).all()):
            return np.zeros(T)
        try:
            step = np.linalg.solve(H, -r)
        except np.linalg.LinAlgError:
            return np.zeros(T)
        # Exact line search on the convex f: phi'(t) = step . gradient(w + t step), by
        # bisection (f's own values cancel too much to compare near the solution).
        slope = r @ step  # phi'(0) < 0
        if not slope < 0:
            break
        neg = step < 0  # stay inside w > 0: at most 99% of the way to the boundary
        hi = min(1.0, 0.99 * np.min(-w[neg] / step[neg])) if neg.any() else 1.0
        t, lo = hi, 0.0
        for _ in range(60):
            d = step @ gradient(w + t * step)
            if d <= 0 or abs(d) <= 0.1 * abs(slope):  # still descending, or near the minimum
                break
            hi = t
            t = 0.5 * (lo + hi)
        w = w + t * step
    if not residual(w) < 1e-10:
        return np.zeros(T)
    with np.errstate(over="ignore"):
        w = w * s ** (-alpha / (1.0 + alpha))
    return w if np.isfinite(w).all() else np.zeros(T)


class FairGrad(Method):
    """FairGrad (Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning"): d =
    sum_i w_i g_i maximizes the alpha-fair utility sum_i (g_i . d)^(1 - alpha) / (1 - alpha)
    of the tasks' loss decreases (log for alpha = 1), which gives G w = w^(-1/alpha) with
    w > 0. alpha = 1 is proportional fairness (Nash-MTL's equations, unnormalized), alpha -> 0
    the plain sum, alpha -> infinity max-min fairness (G w = 1). The default alpha = 2 is
    the one the authors' CelebA and QM9 scripts run (their code's flag defaults to 1, which
    is our ``nash`` with normalize=False). The official code solves the equations with
    scipy's least_squares from w = 1/T (stopping at its default tolerances); we minimize
    the convex function whose stationary point they are, by Newton's method, to a relative
    residual of 1e-13. ``alpha`` is kept in [0.01, 10], where that solve is reliable. A zero
    gradient gets weight 0; with 0 in the convex hull of the others (Pareto-stationary)
    there is no solution and the weights are 0, the disagreement point (as ``nash``)."""

    name = "fairgrad"
    gradient_based = True
    params = {"alpha": Param(2.0, Limit(float, 0.01, 10.0))}

    def weights(self, G):
        T = G.shape[0]
        w = np.zeros(T)
        live, Gl = live_block(G)
        if len(live) == 0 or zero_in_hull(Gl):  # no solution: the disagreement point
            return w
        w[live] = alpha_fair_weights(Gl, float(self.options["alpha"]))
        return w
