"""PCGrad as a method of the family: the per-step orders and the T x T algebra of mtbert.mtl.pcgrad."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...limits import NON_NEGATIVE
from ..pcgrad import combination_weights
from .base import REDUCTION, SEED, OrderedMethod, Param


class PCGradMethod(OrderedMethod):
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): project g_i
    onto the normal plane of each conflicting original g_j; the T x T algebra of
    :mod:`mtbert.mtl.pcgrad`, unchanged."""

    name = "pcgrad"
    gradient_based = True

    params = {"reduction": REDUCTION, "eps": Param(1e-12, NON_NEGATIVE), "seed": SEED}

    def weights(self, G, order: Optional[np.ndarray] = None):
        order = self.orders(G.shape[0], order)
        return combination_weights(G, order, self.options["reduction"], float(self.options["eps"]))
