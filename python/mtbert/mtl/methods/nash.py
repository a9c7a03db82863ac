"""Nash-MTL: multi-task learning as a bargaining game."""

from __future__ import annotations

import numpy as np

from ...limits import NON_NEGATIVE
from .base import Method, Param, live_block
from .mgda import zero_in_hull


class NashMTL(Method):
    """Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game"): the
    alpha > 0 with (G alpha)_i = 1 / alpha_i, found as the minimizer of the strictly convex
    f(alpha) = alpha^T G alpha / 2 - sum log alpha_i by damped Newton steps (no cvxpy).
    ``normalize`` divides G by its Frobenius norm first (as the official code does);
    ``max_norm`` > 0 clips ||d|| (the official trainer clips to 1). Zero gradients get
    weight 0; with no common ascent direction (0 in the convex hull: no bargaining
    solution) the weights are 0, the disagreement point."""

    name = "nash"
    gradient_based = True
    params = {"normalize": Param(True, choices=(True, False)), "max_norm": Param(0.0, NON_NEGATIVE)}

    def weights(self, G):
        T = G.shape[0]
        w = np.zeros(T)
        live, Gl = live_block(G)
        if len(live) == 0 or zero_in_hull(Gl):  # no solution: the disagreement point
            return w
        m = np.abs(Gl).max()
        s = m * np.linalg.norm(Gl / m)  # Frobenius norm, safe from underflow
        Gn = Gl / s  # solved at unit scale; alpha(G / s) = sqrt(s) alpha(G)
        a = 1.0 / np.sqrt(np.diag(Gn))
        f = lambda x: 0.5 * x @ Gn @ x - np.log(x).sum()
        residual = lambda x: np.abs(x * (Gn @ x) - 1.0).max()  # the bargaining equations
        for _ in range(200):
            if residual(a) < 1e-12:
                break
            r = Gn @ a - 1.0 / a
            try:
                step = np.linalg.solve(Gn + np.diag(1.0 / a**2), -r)
            except np.linalg.LinAlgError:  # 1/a^2 underflowed: a diverges, no solution
                return w
            if -r @ step < 1e-6 and np.all(a + step > 0):  # quadratic region: full steps
                a = a + step
                continue
            t = 1.0
            fa = f(a)  # Armijo, up to f's own rounding (large alpha: f ~ 1e3 and more)
            while np.any(a + t * step <= 0) or f(a + t * step) > fa + 0.25 * t * (r @ step) + 1e-15 * abs(fa):
                t *= 0.5
                if t < 1e-12:
                    break
            if t < 1e-12:  # no more progress at f's precision
                break
            a = a + t * step
            if a.max() > 1e12:  # f unbounded below: no bargaining solution
                return w
        if not residual(a) < 1e-8:
            return w
        w[live] = a if self.options["normalize"] else a / np.sqrt(s)
        max_norm = float(self.options["max_norm"])
        norm = np.sqrt(max(w @ G @ w, 0.0))
        if max_norm > 0 and norm > max_norm:
            w *= max_norm / norm
        return w
