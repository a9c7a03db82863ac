"""Uncertainty weighting."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ...limits import Limit
from .base import Method, Param, loss_values


class UW(Method):
    """Uncertainty weighting (Kendall et al. 2018, "Multi-Task Learning Using Uncertainty to
    Weigh Losses"): loss = sum_i exp(-s_i) L_i / 2 + s_i / 2 with learnable s_i = log
    sigma_i^2 (LibMTL's form), each starting at ``init``."""

    name = "uw"
    # exp(-s) of float32 overflows beyond |s| ~ 88; the weights stay within 1e-22..1e22 here
    params = {"init": Param(0.0, Limit(float, -50.0, 50.0))}

    def __init__(self, num_tasks: Optional[int] = None, **options):
        super().__init__(**options)
        self.log_vars: Optional[torch.nn.Parameter] = None
        if num_tasks is not None:
            self.setup(num_tasks)

    def setup(self, num_tasks: int) -> None:
        if self.log_vars is None:
            self.log_vars = torch.nn.Parameter(torch.full((num_tasks,), float(self.options["init"])))
        elif self.log_vars.numel() != num_tasks:  # one log-variance per task, fixed at the start
            raise ValueError(f"uw has the log-variances of {self.log_vars.numel()} tasks, got {num_tasks}; "
                             "use a new method object for other tasks")

    def loss_weights(self, losses):
        self.setup(len(losses))
        return (0.5 * torch.exp(-self.log_vars.detach().double())).numpy()

    def weights(self, G):
        return self.loss_weights([0.0] * G.shape[0])

    def weighted_loss(self, losses: Sequence[Optional[Tensor]], values: Optional[Sequence[Optional[float]]] = None,
                      share: float = 1.0) -> tuple[Tensor, np.ndarray]:
        """The differentiable total loss (its gradient also trains s); a missing loss (None)
        counts as 0, so its log-variance term still enters. ``share`` scales the s terms (they
        do not depend on the data): under torchrun each rank adds 1/W of them, so that the sum
        of the ranks' gradients counts them once."""
        present = [l for l in losses if isinstance(l, Tensor)]
        self.setup(len(losses))
        s = self.log_vars
        if not present:
            if share >= 1.0:
                raise ValueError("no loss tensor to backward")
            # a data-parallel rank without any example still adds its share of the s terms
            total = sum(0.5 * s[i] * share for i in range(len(losses)))
            return total, self.loss_weights(values if values is not None else [None] * len(losses))
        if values is None:
            values = loss_values(losses)
        zero = present[0].new_zeros(())
        reg = [0.5 * s[i].to(l.dtype) if share == 1.0 else 0.5 * s[i].to(l.dtype) * share
               for i, l in enumerate(l if isinstance(l, Tensor) else zero for l in losses)]
        total = sum(0.5 * torch.exp(-s[i]).to(l.dtype) * l + reg[i]
                    for i, l in enumerate(l if isinstance(l, Tensor) else zero for l in losses))
        return total, self.loss_weights(values)

    def parameters(self):
        return [] if self.log_vars is None else [self.log_vars]

    def state_dict(self):
        return {"log_vars": None if self.log_vars is None else self.log_vars.detach().tolist()}

    def load_state_dict(self, state):
        if state.get("log_vars") is not None:
            self.setup(len(state["log_vars"]))
            with torch.no_grad():
                self.log_vars.copy_(torch.tensor(state["log_vars"], dtype=self.log_vars.dtype))
