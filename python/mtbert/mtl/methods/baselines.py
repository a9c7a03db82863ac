"""The baselines: the plain sum of the task losses (or gradients) and their mean."""

from __future__ import annotations

import numpy as np

from .base import Method


class Sum(Method):
    name = "sum"

    def weights(self, G):
        return np.ones(G.shape[0])


class Mean(Method):
    name = "mean"

    def weights(self, G):
        return np.full(G.shape[0], 1.0 / G.shape[0])

    def loss_weights(self, losses):
        return np.full(len(losses), 1.0 / len(losses))
