"""The scale-free sum: each task's loss divided by a running estimate of its own scale."""

from __future__ import annotations

import numpy as np

from ...limits import POSITIVE_INT, Limit
from .base import Method, Param

# A loss scale below this counts as this (a task fitted to a zero loss gets a large, finite weight).
FLOOR = 1e-12


class ScaleFree(Method):
    """sum_i L_i / s_i, with s_i a running estimate of task i's loss scale (detached: the
    weights carry no gradient).

    Why: the plain sum weighs a task by its loss's units. STS-B's MSE on 0-5 scores starts
    5.6x SST-5's cross-entropy and 13x Quora's (the embedded model before its first step:
    docs/methods.md), so at the start of training the sum is mostly STS. Dividing by the loss's own scale makes every task's term start near 1,
    whatever its units, with no weight to tune.

    ``estimate``:

    - ``"ema"`` (default): s_i is an exponential moving average of task i's detached loss,
      rate ``beta``, with Adam's bias correction: m_i <- beta m_i + (1 - beta) L_i,
      s_i = m_i / (1 - beta^n_i), n_i the number of steps that had a loss of task i. The
      estimate includes the current step's loss, so the first step's weight is exactly
      1 / L_i (no special case), and a bias-corrected average is an unbiased mean of the
      losses seen so far from the first step on (a plain EMA started at 0 would under-estimate
      the scale, and over-weight the task, for ~1 / (1 - beta) steps). Because s_i follows
      the loss down, each term stays near 1: the gradient is that of a smoothed sum of log
      losses, and a task whose loss falls is not forgotten.
    - ``"first"``: s_i is the mean of task i's first ``k`` losses, then fixed: after k steps
      this is a *fixed* weighted sum (a point on the sum's trade-off front, chosen by the
      losses' initial scales instead of by tuning).

    A task without a batch in a step (``--sampling`` other than round-robin) leaves its
    estimate and its count unchanged; a task never seen yet has weight 1 (it has no loss to
    weigh). The state (per-task averages and counts) is JSON, so a resumed run continues
    exactly.
    """

    name = "scalefree"
    # its estimate must see every loss: it runs also on steps that drew a single task
    weighs_every_step = True
    params = {
        "estimate": Param("ema", choices=("ema", "first")),
        # 0.99: an average over ~100 steps, a third of an epoch of the default 300 steps
        "beta": Param(0.99, Limit(float, 0.0, 1.0, hi_open=True)),
        "k": Param(50, POSITIVE_INT),
    }

    def __init__(self, **options):
        super().__init__(**options)
        self.average: list[float] = []  # per task: the EMA m_i ("ema") or the sum of losses ("first")
        self.count: list[int] = []  # per task: losses seen (n_i)

    def _grow(self, T: int) -> None:
        if len(self.count) != T:
            if self.count:
                raise ValueError(f"scalefree: {T} losses, but the estimate holds {len(self.count)} tasks")
            self.average, self.count = [0.0] * T, [0] * T

    def scales(self) -> np.ndarray:
        """(T,) the current estimates s_i (NaN for a task not seen yet)."""
        s = np.full(len(self.count), np.nan)
        beta = float(self.options["beta"])
        for i, (m, n) in enumerate(zip(self.average, self.count)):
            if n:
                if self.options["estimate"] == "ema":
                    s[i] = m / (1.0 - beta ** n)
                else:
                    s[i] = m / min(n, int(self.options["k"]))
        return s

    def current_weights(self, T: int) -> np.ndarray:
        self._grow(T)
        s = self.scales()
        return np.where(np.isfinite(s), 1.0 / np.maximum(np.nan_to_num(s, nan=1.0), FLOOR), 1.0)

    def update(self, losses) -> None:
        """Add one step's losses (None or NaN: no batch of the task this step)."""
        self._grow(len(losses))
        beta, k = float(self.options["beta"]), int(self.options["k"])
        for i, loss in enumerate(losses):
            if loss is None or not np.isfinite(loss):
                continue
            if self.options["estimate"] == "ema":
                self.average[i] = beta * self.average[i] + (1.0 - beta) * float(loss)
            elif self.count[i] >= k:
                continue  # "first": fixed after k losses
            else:
                self.average[i] += float(loss)
            self.count[i] += 1

    def loss_weights(self, losses):
        """This step's weights 1 / s_i, the estimates including this step's losses."""
        self.update(losses)
        return self.current_weights(len(losses))

    def weights(self, G):
        # gradients carry no losses: the weights of the estimates so far, which stay as they are
        return self.current_weights(G.shape[0])

    def state_dict(self):
        return {"average": list(self.average), "count": list(self.count)}

    def load_state_dict(self, state):
        self.average = [float(v) for v in state["average"]]
        self.count = [int(v) for v in state["count"]]
