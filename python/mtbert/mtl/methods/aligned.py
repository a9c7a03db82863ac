"""Aligned-MTL: independent component alignment."""

from __future__ import annotations

import numpy as np

from .base import Method, Param


class AlignedMTL(Method):
    """Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task
    Learning"): replace the gradients by the closest orthogonal system scaled by the
    smallest singular value (sigma_min U V^T), i.e. weights W = V diag(sqrt(l_min / l)) V^T
    from G = V diag(l) V^T (eigenvalues below l_max T eps_float32 dropped, as the official
    code does), then sum: w = W 1. ``scale``: "min", "median" or "rmse" (official modes)."""

    name = "aligned"
    gradient_based = True

    params = {"scale": Param("min", choices=("min", "median", "rmse"))}  # the official code's modes

    def weights(self, G):
        T = G.shape[0]
        lam, V = np.linalg.eigh(G)
        keep = lam > lam.max(initial=0.0) * T * np.finfo(np.float32).eps
        if not keep.any() or not lam.max(initial=0.0) > 0:
            return np.zeros(T)
        lam, V = lam[keep], V[:, keep]
        # "median": the lower middle value for an even count, as torch.median (official code).
        ref = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2],
               "rmse": lam.mean()}[self.options["scale"]]
        return V @ (np.sqrt(ref / lam) * V.sum(axis=0))
