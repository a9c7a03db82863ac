"""Dynamic weight average."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...limits import POSITIVE, POSITIVE_INT
from .base import Method, Param, softmax


class DWA(Method):
    """Dynamic weight average (Liu et al. 2019, "End-to-End Multi-Task Learning with
    Attention"): w_i = T softmax_i(r_i / temperature), r_i = L_i(k-1) / L_i(k-2) the ratio
    of the mean losses of the last two periods (``period`` steps each; the paper's period
    is an epoch); w = 1 until two periods are complete."""

    name = "dwa"

    params = {"temperature": Param(2.0, POSITIVE), "period": Param(1, POSITIVE_INT)}

    def __init__(self, **options):
        super().__init__(**options)
        self.history: list[list[float]] = []  # mean losses of the last two complete periods
        self.running: Optional[list[float]] = None  # loss sums of the current period
        self.count = 0

    def current_weights(self, T: int) -> np.ndarray:
        if self.history and len(self.history[-1]) != T:
            raise ValueError(f"dwa was fed the losses of {len(self.history[-1])} tasks, now {T}; "
                             "use a new method object for other tasks")
        if len(self.history) < 2:
            return np.ones(T)
        prev, last = (np.array(h, dtype=np.float64) for h in self.history)  # None -> NaN
        # A task with no loss in a period (sampled out) or a zero loss keeps ratio 1.
        ok = np.isfinite(prev) & np.isfinite(last) & (prev > 0)
        r = np.where(ok, last / np.where(ok, prev, 1.0), 1.0)
        z = r / float(self.options["temperature"])
        return T * softmax(z)

    def loss_weights(self, losses):
        """``losses``: this step's task losses; None (or NaN) for a task without a batch."""
        w = self.current_weights(len(losses))
        self._record([float("nan") if l is None else float(l) for l in losses])
        return w

    def _record(self, losses: list[float]) -> None:
        known = len(self.running) if self.running is not None else (len(self.history[-1]) if self.history else None)
        if known is not None and len(losses) != known:  # a history of other tasks would mix them up
            raise ValueError(f"dwa was fed the losses of {known} tasks, now {len(losses)}; "
                             "use a new method object for other tasks")
        if self.running is None:
            self.running = [[0.0, 0] for _ in losses]  # per task: loss sum, steps with a loss
        for acc, l in zip(self.running, losses):
            if np.isfinite(l):
                acc[0] += l
                acc[1] += 1
        self.count += 1
        if self.count == int(self.options["period"]):
            means = [s / n if n else None for s, n in self.running]  # None: JSON-safe
            self.history = (self.history + [means])[-2:]
            self.running, self.count = None, 0

    def weights(self, G):
        # Gradients carry no losses: the weights of the history so far, which stays as is.
        return self.current_weights(G.shape[0])

    def state_dict(self):
        return {"history": self.history, "running": self.running, "count": self.count}

    def load_state_dict(self, state):
        self.history, self.running, self.count = state["history"], state["running"], state["count"]
