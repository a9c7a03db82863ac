"""IMTL-G: impartial multi-task learning."""

from __future__ import annotations

import numpy as np

from .base import Method, live_block, norms


class IMTL(Method):
    """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"): the weights,
    summing to 1, for which d has equal projections on every unit gradient u_i:
    alpha_{2:T} = g_1 U^T (D U^T)^{-1} with D rows g_1 - g_i, U rows u_1 - u_i. A zero
    gradient gets weight 0; a singular system takes the least-squares solution."""

    name = "imtl"
    gradient_based = True

    def weights(self, G):
        T = G.shape[0]
        w = np.zeros(T)
        live, Gl = live_block(G)
        if len(live) == 0:
            return w
        n = norms(G)[live]
        Gu = Gl / n[None, :]  # Gu[a, b] = g_a . u_b
        D_U = Gu[0, 0] - Gu[0, 1:][None, :] - Gu[1:, 0][:, None] + Gu[1:, 1:]  # (g_1 - g_a).(u_1 - u_b)
        g1_U = Gu[0, 0] - Gu[0, 1:]  # g_1 . (u_1 - u_b)
        alpha = np.linalg.lstsq(D_U.T, g1_U, rcond=None)[0]  # alpha D_U = g1_U
        w[live] = np.r_[1.0 - alpha.sum(), alpha]
        return w
