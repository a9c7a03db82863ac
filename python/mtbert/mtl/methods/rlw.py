"""Random loss weighting."""

from __future__ import annotations

import numpy as np

from .base import SEED, Method, softmax


class RLW(Method):
    """Random loss weighting (Lin et al. 2021, "Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning"): w = softmax(z), z ~ N(0, I) each step."""

    name = "rlw"
    params = {"seed": SEED}

    def __init__(self, **options):
        super().__init__(**options)
        self._rng = np.random.default_rng(self.options["seed"])

    def loss_weights(self, losses):
        z = self._rng.standard_normal(len(losses))
        return softmax(z)

    def weights(self, G):
        return self.loss_weights([0.0] * G.shape[0])

    def state_dict(self):
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state):
        self._rng.bit_generator.state = state["rng"]
