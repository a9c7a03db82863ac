"""UPGrad: each task gradient projected onto the dual cone of all of them."""

from __future__ import annotations

import numpy as np
import scipy.optimize

from .base import REDUCTION, Method


# Ridge on the QP's variables, relative to the largest squared gradient norm: where G is
# singular, weights that give the same projection differ along G's null space; the ridge
# keeps them bounded (without it NNLS can follow rounding noise to weights of 1e30); the
# exact least squares on the support NNLS found then removes its bias.
RIDGE = 1e-12


def dual_cone_weights(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The weights v of the projection of ``J^T u`` onto the dual cone {x : J x >= 0} of the
    rows of J (G = J J^T): v = argmin_{v >= u} v^T G v, solved as a non-negative
    least-squares problem (scipy's active-set NNLS, exact in finitely many steps).

    With G / s = A^T A (A from the eigendecomposition, eigenvalues at rounding level
    dropped; s the largest diagonal entry), v = u + x and
    x = argmin_{x >= 0} ||A x + A u||^2 + RIDGE ||x||^2, then re-solved exactly on the
    support that NNLS found."""
    T = G.shape[0]
    u = np.asarray(u, dtype=np.float64)
    scale = np.max(np.diag(G), initial=0.0)
    if not scale > 0:  # every gradient is zero: the projection is 0 whatever v
        return u.copy()
    lam, V = np.linalg.eigh(G / scale)
    keep = lam > T * np.finfo(np.float64).eps * lam.max()
    A = np.sqrt(lam[keep])[:, None] * V[:, keep].T  # (r, T), A^T A = G / scale up to rounding
    M = np.vstack([A, np.sqrt(RIDGE) * np.eye(T)])
    b = -(A @ u)
    x, _ = scipy.optimize.nnls(M, np.r_[b, np.zeros(T)], maxiter=50 * T)
    # The ridge's bias removed: on the support S that NNLS found, the optimality equations
    # G_SS x_S = -(G u)_S solved on G itself (not its square root: no loss of precision), by
    # least squares (the minimum-norm solution, still bounded where G_SS is singular); kept
    # where it stays >= 0.
    support = np.flatnonzero(x > 0)
    if len(support):
        Gs = G / scale
        exact = np.zeros(T)
        exact[support] = np.linalg.lstsq(Gs[np.ix_(support, support)], -(Gs @ u)[support], rcond=1e-13)[0]
        if np.all(exact >= 0):
            x = exact
    return u + x


class UPGrad(Method):
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization"): each
    task gradient g_i projected onto the dual cone of the gradients (the directions that
    conflict with none of them), d = mean_i pi(g_i). In weights: pi(g_i) = J^T v_i with
    v_i = argmin_{v >= e_i} v^T G v (a QP in T x T per task, solved exactly by NNLS in
    float64, no QP library) and w = mean_i v_i (``reduction="sum"``: their sum). Without
    conflicts every projection is its own gradient and d is the mean (sum) of the
    gradients. TorchJD (the authors' library) solves the same QP with quadprog on G
    normalized and regularized by 1e-4 I; we solve it on G itself (a 1e-12 ridge keeps the
    weights bounded where G is singular, and is removed on the support it finds)."""

    name = "upgrad"
    gradient_based = True
    params = {"reduction": REDUCTION}

    def weights(self, G):
        T = G.shape[0]
        w = np.zeros(T)
        for i in range(T):
            w += dual_cone_weights(G, np.eye(T)[i])
        return w / T if self.options["reduction"] == "mean" else w
