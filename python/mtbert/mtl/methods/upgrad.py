"""UPGrad: each task gradient projected onto the dual cone of all of them."""

from __future__ import annotations

import numpy as np
import scipy.optimize

from .base import REDUCTION, Method, Param


def dual_cone_weights(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The weights v of the projection of ``J^T u`` onto the dual cone {x : J x >= 0} of the
    rows of J (G = J J^T): v = argmin_{v >= u} v^T G v, solved exactly as a non-negative
    least-squares problem (scipy's active-set NNLS).

    With G / s = A^T A (a square root from the eigendecomposition, s the largest diagonal
    entry), v = u + x and x = argmin_{x >= 0} ||A x + A u||^2. The argmin in x may not be
    unique when G is singular; the projection J^T v is."""
    T = G.shape[0]
    scale = np.max(np.diag(G), initial=0.0)
    if not scale > 0:  # every gradient is zero: the projection is 0 whatever v
        return np.array(u, dtype=np.float64)
    lam, V = np.linalg.eigh(G / scale)
    A = np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T  # (T, T), A^T A = G / scale
    x, _ = scipy.optimize.nnls(A, -(A @ u), maxiter=50 * T)
    return u + x


class UPGrad(Method):
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization"): each
    task gradient g_i projected onto the dual cone of the gradients (the directions that
    conflict with none of them), d = mean_i pi(g_i). In weights: pi(g_i) = J^T v_i with
    v_i = argmin_{v >= e_i} v^T G v (a QP in T x T per task, solved exactly by NNLS in
    float64, no QP library) and w = mean_i v_i (``reduction="sum"``: their sum). Without
    conflicts every projection is its own gradient and d is the mean (sum) of the
    gradients. TorchJD (the authors' library) solves the same QP with quadprog on G
    normalized and regularized by 1e-4 I; we solve it on G itself."""

    name = "upgrad"
    gradient_based = True
    params = {"reduction": REDUCTION}

    def weights(self, G):
        T = G.shape[0]
        w = np.zeros(T)
        for i in range(T):
            w += dual_cone_weights(G, np.eye(T)[i])
        return w / T if self.options["reduction"] == "mean" else w
