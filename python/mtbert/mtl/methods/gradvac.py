"""Gradient Vaccine."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...limits import Limit
from .base import SEED, OrderedMethod, Param, norms as gradient_norms

# A corrected gradient shorter than this fraction of the original has cancelled out.
_CANCELLED = 1e-7
# A corrected g_i whose squared norm fell below this fraction of the original's has its dot
# products recomputed from G instead of updated (an update's rounding would dominate them).
_RECOMPUTE = 1e-6


class GradVac(OrderedMethod):
    """Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models"), Algorithm 1: for each pair
    whose cosine phi is below the EMA target phi_hat, add to g_i the multiple of g_j that
    brings the cosine to phi_hat; then phi_hat <- (1 - beta) phi_hat + beta phi (every pair).
    Targets start at 0 (so the first corrections are PCGrad's); sum of the results."""

    name = "gradvac"
    gradient_based = True
    # a Python loop over T^2 ordered pairs: 1.2 s at T = 256, 32 s at 512 (loaded machine; docs/benchmarks.md)
    max_tasks = 256

    params = {"beta": Param(0.01, Limit(float, 0.0, 1.0)), "reduction": Param("sum", choices=("mean", "sum")),
              "seed": SEED}

    def __init__(self, **options):
        super().__init__(**options)
        self.targets: Optional[np.ndarray] = None  # (T, T) EMA of the cosines

    def weights(self, G, order: Optional[np.ndarray] = None):
        T, beta = G.shape[0], float(self.options["beta"])
        if self.targets is None or self.targets.shape != (T, T):
            self.targets = np.zeros((T, T))
        order = self.orders(T, order)
        norms = gradient_norms(G).tolist()  # Python floats: the loop below is scalar work
        C = np.eye(T)  # row i: the coefficients of the corrected g_i
        for i in range(T):
            c = C[i]  # a view: corrections write into C
            v = c @ G  # (T,): the corrected g_i's dot products with every g_j, kept up to date
            norm2 = float(c @ v)  # its squared norm
            targets = self.targets[i]
            for j in order[i].tolist():
                if j == i:
                    continue
                norm_i = math.sqrt(max(norm2, 0.0))
                # A g_i cancelled to rounding noise (|g_i|^2 from G has ~1e-16 relative
                # error, so its norm ~1e-8) or a zero g_j: no angle to correct.
                if norm_i <= _CANCELLED * norms[i] or norms[j] == 0:
                    continue
                phi = min(max(float(v[j]) / (norm_i * norms[j]), -1.0), 1.0)
                target = float(targets[j])
                if phi < target < 1.0:
                    delta = norm_i * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2)) \
                        / (norms[j] * math.sqrt(1 - target**2))
                    c[j] += delta
                    v += delta * G[j]  # O(T) per correction (G is symmetric): O(T^3) in all
                    norm2 = float(c @ v)
                    if norm2 < _RECOMPUTE * norms[i] ** 2:  # cancelling: the sums afresh, as accurate as G allows
                        v = c @ G
                        norm2 = float(c @ v)
                targets[j] = (1 - beta) * target + beta * phi
        w = C.sum(axis=0)
        return w / T if self.options["reduction"] == "mean" else w

    def state_dict(self):
        return {**super().state_dict(), "targets": None if self.targets is None else self.targets.tolist()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.targets = None if state.get("targets") is None else np.array(state["targets"], dtype=np.float64)
